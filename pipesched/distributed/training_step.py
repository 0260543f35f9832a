"""``DistributedPipeline.step``: a training step, from the batch to the committed gradients.

The phases that talk to other processes are :class:`~pipesched.distributed.step_frame.StepFrame`'s;
this mixin strings them together in the order every rank follows, and adds what
wraps the plan: loss scaling, data parallelism over replicas or ``mesh["dp"]``,
the tied weights' reduction, the inputs' gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipesched.distributed.outcome import merged_costs
from pipesched.distributed.step_frame import StepFrame
from pipesched.observe.report import CommRecord
from pipesched.runtime.backward_half import backward_into_inputs
from pipesched.runtime.compiling import compile_callback, compile_refused
from pipesched.runtime.grad_scaling import backward_seed, poison_gradients
from pipesched.runtime.options import grad_disabled, missing_loss_fn
from pipesched.runtime.runner import SplitBatch
from pipesched.runtime.step_effects import StepEffects
from pipesched.runtime.tasks import StepContext


class TrainingStep(StepFrame):
    """Mixin of :class:`~pipesched.distributed.DistributedPipeline`: :meth:`step`."""

    def step(self, inputs: Tensor | tuple[Tensor, ...] | None = None,
             targets: Tensor | tuple[Tensor, ...] | None = None, *, scaler: Any = None) -> Tensor:
        """Forward and backward of the whole batch; returns the loss on every rank.

        Call it on every rank. ``inputs`` matter on the rank owning stage 0,
        ``targets`` on the rank owning the last stage; other ranks may pass
        ``None``. Gradients accumulate into this rank's parameters and equal
        those of the single-process run; inputs that require grad get their
        ``.grad`` on stage 0's rank, written as ``Pipeline.step`` writes it.
        An error on any rank is raised on every rank: the original exception
        where it happened, a
        :class:`~pipesched.distributed.errors.RemoteStepError` naming it elsewhere.
        A rank that dies or stops answering raises
        :class:`~pipesched.distributed.errors.PeerLost` within about ``stall_timeout``,
        and the pipeline is then unusable.

        Three phases, each its own method (:mod:`pipesched.distributed.step_frame`):
        agree on the batch size (a broadcast from stage 0's rank), run this rank's share of the plan
        (sending and receiving as the lowering says), share every rank's
        outcome (an all-gather, so errors and the loss reach every rank).

        ``scaler``: a ``torch.amp.GradScaler`` (one per process) for float16
        loss scaling, as for :meth:`Pipeline.step <pipesched.Pipeline.step>`.
        Each process's scaler checks only its own gradients, so a process
        whose gradients are all finite would step while another skips, and
        the model would come apart. So the end-of-step exchange also says
        whether any rank's gradients hold an inf or NaN, and if one does,
        every rank's gradients are made NaN: every scaler then skips the
        step and backs off alike, as the un-pipelined model's one scaler
        does.
        """
        if torch.compiler.is_compiling() or compile_callback() not in (None, False):
            raise compile_refused("DistributedPipeline")  # inline on purpose: see pipesched.runtime.compiling
        if self._broken is not None:
            raise RuntimeError(f"this pipeline is unusable after {self._broken}; restart the job")
        if not torch.is_grad_enabled():
            raise grad_disabled()
        last = self.placement[-1]
        if self._mesh is not None:
            self._unshard_mesh()  # first, on every replica: a collective no failure may skip
        try:
            statuses, effects, ctx, split, comm = self._train(inputs, targets, scaler)
        except BaseException:
            self._replicas_failed()
            if self._mesh is not None and self._broken is None:
                self._mesh.fail()
            raise
        value, dtype = statuses[last]["loss"]
        if self._replicas is not None:
            value = self._reduce_replicas(statuses[last], value, effects, ctx)
        if self._mesh is not None:
            value = self._reduce_mesh(statuses[last], value, effects, ctx, scaled=scaler is not None)
        effects.commit()
        if self._replicas is not None:
            self._replicas.broadcast(self.local_stages)  # batch-norm statistics: the first replica's
        self._record(statuses, len(split.sizes), comm)
        if self._shares_costs(with_loss=True):  # every rank, the same merged table: the same next plan
            self._runner.learn_costs(merged_costs(statuses, self.placement))
        if self.rank == self.placement[0]:  # the inputs' .grad, as Pipeline.step writes it
            backward_into_inputs(split.tensors, ctx, split.sizes)
        return torch.tensor(value, dtype=dtype)

    def _train(self, inputs: Any, targets: Any, scaler: Any
               ) -> tuple[list[Any], StepEffects, StepContext, SplitBatch, list[CommRecord]]:
        """This pipeline's step, up to (not including) the commit of its gradients."""
        last = self.placement[-1]
        local_error = missing_loss_fn() if self.rank == last and self.loss_fn is None else None
        split, shapes, local_error = self._agree_on_batch(inputs, local_error)
        count = len(split.sizes)
        plan, lowering = self._runner.plan(count)
        io, local_error = self._step_inputs(split, targets, local_error)
        if local_error is None:
            try:
                io.loss_seed = backward_seed(scaler, self.device)
            except TypeError as error:  # raised on every rank, as any step error
                local_error = error
        ctx = self._runner.context(lowering, keep=True, io=io, clock_offset=self.clock_offset)
        # under a mesh the stages are gathered now: their .grad is FSDP's, the optimizer's are the shards'
        effects = self._runner.effects(self._mesh.parameters + self._mesh.loss_parameters
                                       if self._mesh is not None else self.parameters())
        records, local_error, comm = self._run_plan(plan, ctx, effects, local_error, shapes)
        statuses = self._share_outcome(ctx, records, local_error, effects, scaled=io.loss_seed is not None)
        if any(s["nonfinite"] for s in statuses):
            poison_gradients(self.parameters())  # every rank's scaler skips this step alike
        self._reduce_tied(effects)
        return statuses, effects, ctx, split, comm


__all__ = ["TrainingStep"]
