"""Every schedule x every checkpoint policy on a traced, cut Hugging Face model, in float64.

A cut model (``Pipeline(model, split_points=...)``) feeds the engine stages of
another kind than an ``nn.Sequential``'s (graph modules taking a mapping, then
tuples with ``None`` entries; a tied embedding/head shared by the first and last
stage), so each schedule family and each checkpoint policy is checked on one:

* ``test_every_policy_exact[schedule]`` (CI): every registered schedule that runs
  on 2 ranks, with the stage count it needs (2, or 4 in a loop or a V), on a
  tiny tied GPT-2. One pipeline per schedule; its ``checkpoint=`` is a
  callable whose policy the test switches between steps (``never``,
  ``except_last``, ``always``, and alternate stages), which is what the string
  policies are turned into (:func:`pipesched.runtime.checkpoint.make_policy`):
  building costs a trace, a step on this model costs little. Each step's loss
  and every gradient equal the plain model's on the same batch (1e-12), at
  two batch shapes (the second splits unevenly).
* ``test_string_policy_matrix[schedule-policy]`` (``slow``, run with
  ``PIPESCHED_SLOW=1``): the same with ``checkpoint="never" | "except_last" |
  "always"`` given as strings, one pipeline per combination.
* Dropout on: the plain model draws other masks, so instead a checkpointed
  recompute must replay the first forward's masks (``always`` equals
  ``never`` on the same seed), and every schedule of one cut draws the same
  masks (each (stage, micro-batch) forward has its own stream).
* ``pipesched.tune`` on a cut model: it profiles the blocks and its best
  candidate's ``Pipeline(model, **best.pipeline_kwargs())`` is exact;
  ``schedule="auto"`` is in the matrix.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from pipesched import CausalLMLoss, Pipeline
from pipesched.plan.registry import schedules_for

transformers = pytest.importorskip("transformers")

from test_any_model import batch, gpt2, reference  # noqa: E402 - after the importorskip

TOLERANCE = 1e-12
RANKS = 2
SCHEDULES = schedules_for(RANKS)  # (name, stages): every family, "auto" and dualpipe-v included
SCHEDULE_IDS = [name for name, _ in SCHEDULES]
POLICIES = ("never", "except_last", "always")
SHAPES = ((8, 12, 1), (6, 9, 2))  # rows, tokens, seed: the second gives micro-batches of 2, 2, 1, 1
slow = pytest.mark.slow  # run with PIPESCHED_SLOW=1 (tests/conftest.py)


def split_points(stages: int) -> list[str]:
    """``stages`` stages over GPT-2's 4 blocks: 2 (halves) or 4 (one block each)."""
    return [f"transformer.h.{i * 4 // stages}" for i in range(1, stages)]


class SwitchablePolicy:
    """``checkpoint=`` as a callable ``(stage, microbatch) -> bool`` whose policy a test switches between steps."""

    def __init__(self, chunks: int):
        self.chunks = chunks
        self.policy = "never"
        self.checkpointed: set[str] = set()  # the policies under which some forward was checkpointed

    def __call__(self, stage: int, microbatch: int) -> bool:
        decision = self._decide(stage, microbatch)
        if decision:
            self.checkpointed.add(self.policy)
        return decision

    def _decide(self, stage: int, microbatch: int) -> bool:
        if self.policy == "always":
            return True
        if self.policy == "except_last":  # micro-batches of one step: the last one is chunks - 1 or fewer
            return microbatch < self.count - 1
        if self.policy == "alternate":
            return (stage + microbatch) % 2 == 0
        return False

    count = 4  # micro-batches of the coming step (set by the test: a short batch runs fewer)


def assert_step_exact(model: nn.Module, pipe: Pipeline, rows: int, tokens: int, seed: int) -> None:
    inputs, labels = batch(rows, tokens, seed)
    expected, grads = reference(model, inputs, labels)
    loss = pipe.step(inputs, labels)
    assert abs(float(loss - expected)) <= TOLERANCE
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        error = float((p.grad - grads[name]).abs().max())
        assert error <= TOLERANCE, f"{name}: {error:.3g}"
    model.zero_grad()


@pytest.mark.parametrize("schedule,stages", SCHEDULES, ids=SCHEDULE_IDS)
def test_every_policy_exact(schedule, stages):
    torch.manual_seed(0)
    model = gpt2()
    policy = SwitchablePolicy(chunks=4)
    with Pipeline(model, split_points=split_points(stages), schedule=schedule, devices=["cpu"] * RANKS,
                  chunks=4, checkpoint=policy, loss_fn=CausalLMLoss()) as pipe:
        assert len(pipe.stages) == stages
        peaks = {}
        for name in (*POLICIES, "alternate"):
            policy.policy = name
            for rows, tokens, seed in SHAPES:
                policy.count = min(4, rows)
                assert_step_exact(model, pipe, rows, tokens, seed)
                report = pipe.last_report
                peaks.setdefault(name, (report.plan, sum(report.peak_activation_bytes)))
        assert model.lm_head.weight is model.transformer.wte.weight
    # the policy took effect: a checkpointed forward keeps only its stage input (except_last and
    # alternate may peak as never does: a backward recomputes before it waits for its gradient);
    # comparable under one plan ("auto" synthesises another once it has measured costs)
    if peaks["always"][0] == peaks["never"][0]:
        assert peaks["always"][1] < peaks["never"][1], peaks
    assert policy.checkpointed == {"always", "except_last", "alternate"}


@slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("schedule,stages", SCHEDULES, ids=SCHEDULE_IDS)
def test_string_policy_matrix(schedule, stages, policy):
    torch.manual_seed(0)
    model = gpt2()
    with Pipeline(model, split_points=split_points(stages), schedule=schedule, devices=["cpu"] * RANKS,
                  chunks=4, checkpoint=policy, loss_fn=CausalLMLoss()) as pipe:
        for rows, tokens, seed in SHAPES:
            assert_step_exact(model, pipe, rows, tokens, seed)


# ------------------------------------------------------------------ dropout on

#: schedules grouped by the cut they run (stage count): within a group every (stage, micro-batch)
#: forward draws from the same stream, whatever the order the schedule runs them in
DROPOUT_GROUPS = {stages: [name for name, n in SCHEDULES if n == stages] for _, stages in SCHEDULES}
DROPOUT_CI = {2: ["1f1b", "zb-h1"], 4: ["interleaved-1f1b", "zb-v"]}


def gpt2_dropout() -> nn.Module:
    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                     resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
    return transformers.GPT2LMHeadModel(config).double()


def dropout_grads(schedule: str, stages: int) -> dict[tuple[str, int], list[torch.Tensor]]:
    """Gradients of one step per (policy, seed), from one pipeline of a fresh model (same init)."""
    torch.manual_seed(0)
    model = gpt2_dropout()
    policy = SwitchablePolicy(chunks=4)
    inputs, labels = batch(8, 12, 1)
    grads = {}
    with Pipeline(model, split_points=split_points(stages), schedule=schedule, devices=["cpu"] * RANKS,
                  chunks=4, checkpoint=policy, loss_fn=CausalLMLoss()) as pipe:
        for name, seed in (("never", 5), ("always", 5), ("alternate", 5), ("never", 6)):
            policy.policy = name
            torch.manual_seed(seed)
            pipe.step(inputs, labels)
            grads[name, seed] = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
    return grads


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) <= TOLERANCE


def check_dropout_group(stages: int, names: list[str]) -> None:
    first = None
    for name in names:
        grads = dropout_grads(name, stages)
        assert_same(grads["always", 5], grads["never", 5])  # the recompute replayed the masks
        assert_same(grads["alternate", 5], grads["never", 5])
        assert max(float((x - y).abs().max()) for x, y in zip(grads["never", 5], grads["never", 6])) > 1e-6
        if first is None:
            first = grads["never", 5]
        else:
            assert_same(grads["never", 5], first)  # this schedule drew the masks the first one did


@pytest.mark.parametrize("stages", sorted(DROPOUT_CI))
def test_dropout_replayed_across_policies_and_schedules(stages):
    check_dropout_group(stages, DROPOUT_CI[stages])


@slow
@pytest.mark.parametrize("stages", sorted(DROPOUT_GROUPS))
def test_dropout_replayed_across_every_schedule(stages):
    check_dropout_group(stages, DROPOUT_GROUPS[stages])


# ------------------------------------------------------------------ tune


def test_tune_accepts_a_cut_model():
    """``tune`` profiled only ``nn.Sequential`` layers (TypeError on a traced model); now its layers
    are the blocks of the block list, which is what ``balance=`` counts for such a model."""
    import pipesched

    torch.manual_seed(0)
    model = gpt2()
    inputs, labels = batch(8, 12, 1)
    result = pipesched.tune(model, inputs, labels, CausalLMLoss(), devices=RANKS, chunks=[4],
                            schedules=["1f1b", "zb-v"], checkpoint=["never"], repeat=1, measure=1)
    assert {c.schedule for c in result.candidates} == {"1f1b", "zb-v"}
    assert all(sum(c.balance) == len(model.transformer.h) for c in result.candidates)
    assert len(result.profiles[2]) == len(model.transformer.h)  # one profiled layer per block
    assert result.best.measured_step_s is not None  # the candidate ran as Pipeline(model, balance=...)
    kwargs = result.best.pipeline_kwargs()
    with Pipeline(model, **kwargs, loss_fn=CausalLMLoss()) as pipe:
        assert_step_exact(model, pipe, 8, 12, 1)
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel is not an nn.Sequential, so it is traced and cut like "
                                        r"Pipeline\(model\) cuts it; inputs must be a dict"):
        pipesched.tune(model, inputs["input_ids"], labels, CausalLMLoss(), devices=RANKS)


def test_tune_units_leave_out_and_restore_none_entries():
    """A cut stage may output ``None`` entries (skipped by transport); the profiler passes tuples of
    tensors, so a unit leaves them out and the next puts them back where the trace had them."""
    from pipesched.tune.units import BlockUnit

    class Emit(nn.Module):
        def forward(self, value):
            return (value[0] * 2, None, value[1])

    class Take(nn.Module):
        def forward(self, value):
            first, nothing, last = value
            assert nothing is None
            return (first + last,)

    x, y = torch.randn(3, 2), torch.randn(3, 2)
    sent = BlockUnit(Emit(), None, holes_in=[], holes_out=[1])((x, y))
    assert len(sent) == 2 and all(isinstance(t, torch.Tensor) for t in sent)
    (out,) = BlockUnit(Take(), None, holes_in=[1], holes_out=[])(sent)
    assert torch.equal(out, 2 * x + y)
