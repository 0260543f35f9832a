"""One anyio event loop that runs steps: dispatch, collect, record, cancel on the first error.

The loop lives in its own daemon thread, so ``step()`` works from plain
training code and from code whose thread already runs an event loop (Jupyter,
async trainers): the caller only blocks on a future.

Per step the loop hands each rank's whole action list to that rank's worker
in one go (dispatch ahead) and then only waits: data passes rank to rank
through the mailbox without waking the loop, which keeps the loop off the
critical path (a worker → loop → worker hand-off costs a thread wake-up per
task). The last worker to finish (or fail) signals the loop, once per step.

Failure: the failing worker aborts the step's mailbox itself (no round trip),
so every other rank stops at its next action boundary; the loop waits for all
of them inside one task group — nothing is left running — and the caller gets
the original exception, type and traceback intact, with a note naming the
action, stage and micro-batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import anyio
import torch

from pipesched.plan.action import Action
from pipesched.runtime.tasks import StepContext, run_rank
from pipesched.runtime.mailbox import StepAborted
from pipesched.plan.record import TaskRecord
from pipesched.runtime.step_effects import GradientFence
from pipesched.runtime.stream import StreamFence
from pipesched.observe.tasklog import EventLog
from pipesched.runtime.worker import Worker


class StepStalled(TimeoutError):
    """A step in which no task finished for ``stall_timeout`` seconds.

    The message says, per rank, which action it is at and whether that action
    waits for an input (and which) or has been running; ``waiting`` holds the
    same as ``(rank, action, blockers)`` tuples.
    """

    def __init__(self, message: str, waiting: list[tuple[int, Action, tuple[Action, ...]]]):
        super().__init__(message)
        self.waiting = waiting


class _RankOutcome:
    """What a worker reports for its rank: records, and the error that stopped it, if any."""

    def __init__(self) -> None:
        self.records: list[TaskRecord] = []
        self.error: BaseException | None = None
        self.failed_time = 0.0
        self.done = anyio.Event()
        self.returned = threading.Event()  # the worker left the job (set from its thread)
        self._lock = threading.Lock()
        self._on_return: list[Callable[[], None]] = []

    def leave(self) -> None:
        """Called by the worker thread once the job is over: set ``returned``, run the callbacks."""
        with self._lock:
            self.returned.set()
            callbacks, self._on_return = self._on_return, []
        for callback in callbacks:
            callback()

    def when_returned(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the worker left the job: now if it already has."""
        with self._lock:
            if not self.returned.is_set():
                self._on_return.append(callback)
                return
        callback()


class _Countdown:
    """Wakes the loop once, when the last rank of a step has returned, instead of once per rank.

    Each wake-up of the loop thread takes the GIL from the ranks still
    computing; only the last one matters (the loop waits for all ranks).
    It then sets every rank's ``done`` in one callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, outcomes: Iterable[_RankOutcome]):
        self._loop = loop
        self._outcomes = list(outcomes)
        self._left = len(self._outcomes)
        self._lock = threading.Lock()

    def count_down(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            with contextlib.suppress(RuntimeError):  # loop already stopped by close()
                self._loop.call_soon_threadsafe(self._all_done)

    def _all_done(self) -> None:
        for outcome in self._outcomes:
            outcome.done.set()


class Orchestrator:
    """Owns the event-loop thread and one :class:`Worker` per rank it runs.

    In one process it runs every rank (``ranks`` defaults to ``0..len(devices)-1``);
    in a multi-process pipeline each process runs only its own rank of the plan.
    """

    def __init__(
        self,
        devices: Sequence[torch.device],
        stall_timeout: float | None = None,
        ranks: Sequence[int] | None = None,
    ):
        self.devices = list(devices)
        self.ranks = list(ranks) if ranks is not None else list(range(len(self.devices)))
        self.stall_timeout = stall_timeout
        self._stuck: list[tuple[str, threading.Event]] = []  # tasks a stalled step left running
        self.workers = [Worker(rank, device) for rank, device in zip(self.ranks, self.devices)]
        self._ready: Future[tuple[asyncio.AbstractEventLoop, anyio.Event]] = Future()
        self._loop_thread = threading.Thread(target=self._serve, name="pipesched-loop", daemon=True)
        self._loop_thread.start()
        self._loop, self._stop = self._ready.result()
        self._closed = False
        self.steps = 0
        self.events = EventLog()  # this pipeline's structlog events; failures to log only warn

    @property
    def compute_streams(self) -> list[torch.cuda.Stream | None]:
        return [worker.stream for worker in self.workers]

    def _serve(self) -> None:
        """The loop thread: an anyio event loop (asyncio backend) that lives until close().

        Other threads reach it without blocking: the caller schedules a step
        with ``run_coroutine_threadsafe`` and workers signal completion with
        ``call_soon_threadsafe``. (anyio's ``BlockingPortal`` waits for the
        loop to pick each call up, about 0.2 ms a hand-off, measured: too
        much for a signal the loop does not need to answer.)
        """

        async def main() -> None:
            stop = anyio.Event()
            self._ready.set_result((asyncio.get_running_loop(), stop))
            await stop.wait()

        anyio.run(main, backend="asyncio")

    def run(self, plan: Sequence[Sequence[Action]], ctx: StepContext) -> list[TaskRecord]:
        """Run ``plan`` to completion; return its records ordered by start time.

        Blocks the calling thread. On ``KeyboardInterrupt`` (or any other
        interruption of the wait) the step is aborted and the workers are
        waited for before the interruption propagates, so no thread keeps
        computing on a step nobody waits for.
        """
        if self._closed:
            raise RuntimeError("this pipeline is closed; build a new Pipeline")
        for task, returned in self._stuck:
            if not returned.is_set():
                raise RuntimeError(
                    f"this pipeline cannot run: {task} is still running from a stalled step; "
                    f"wait for it to return, or build a new Pipeline (on another copy of the model)"
                )
        self._stuck = []
        fence = StreamFence(self.devices)
        future: Future[list[TaskRecord]] = Future()
        try:
            fence.enter()
            self._loop.call_soon_threadsafe(self._start, self._run(plan, ctx, fence), future)
            records = future.result()
        except BaseException:
            # An interruption (KeyboardInterrupt) may land anywhere here, even while
            # the step is being handed to the loop: a step the loop never started is
            # cancelled; one it started is aborted and waited for, so no worker still
            # writes into .grad when the caller rolls back.
            if not future.cancel() and not future.done():
                ctx.mailbox.abort()
                with contextlib.suppress(BaseException):
                    future.result()
            raise
        finally:
            fence.exit()
        self._log(ctx, records)
        self.steps += 1
        return records

    @staticmethod
    def _start(step: Coroutine[Any, Any, list[TaskRecord]], future: Future[list[TaskRecord]]) -> None:
        """On the loop thread: run ``step`` into ``future``, unless the caller cancelled it first."""
        if not future.set_running_or_notify_cancel():
            step.close()
            return
        task = asyncio.ensure_future(step)

        def deliver(done: asyncio.Task[list[TaskRecord]]) -> None:
            if done.cancelled():
                future.set_exception(RuntimeError("the pipeline's event loop cancelled the step"))
            elif done.exception() is not None:
                future.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                future.set_result(done.result())

        task.add_done_callback(deliver)

    async def _run(self, plan: Sequence[Sequence[Action]], ctx: StepContext, fence: StreamFence) -> list[TaskRecord]:
        outcomes = {rank: _RankOutcome() for rank in self.ranks}
        finish = _Countdown(self._loop, outcomes.values())
        for index, worker in enumerate(self.workers):
            try:
                worker.submit(self._job(ctx, worker, plan[worker.rank], outcomes[worker.rank], fence, finish))
            except BaseException as error:  # noqa: BLE001 - raised below, once the running ranks stopped
                ctx.mailbox.abort()  # the ranks already running would wait for this one forever
                for rank in self.ranks[index:]:
                    outcomes[rank].error = error if rank == worker.rank else StepAborted()
                    outcomes[rank].failed_time = time.perf_counter()
                    outcomes[rank].leave()
                    finish.count_down()
                break
        stalled: list[StepStalled] = []
        async with anyio.create_task_group() as group:

            async def wait_for_ranks() -> None:
                for outcome in outcomes.values():
                    await outcome.done.wait()
                group.cancel_scope.cancel()  # stops the watchdog

            group.start_soon(wait_for_ranks)
            if self.stall_timeout is not None:
                group.start_soon(self._watchdog, plan, ctx, outcomes, stalled, group.cancel_scope)
        if stalled:
            raise stalled[0]
        failed = [o for o in outcomes.values() if o.error is not None]
        errors = [o for o in failed if not isinstance(o.error, StepAborted)]
        if errors:
            first = min(errors, key=lambda o: o.failed_time)
            raise first.error  # type: ignore[misc]
        if failed:  # aborted from outside this process (a remote rank failed)
            raise ctx.mailbox.abort_reason or failed[0].error  # type: ignore[misc]
        return sorted((r for o in outcomes.values() for r in o.records), key=lambda r: (r.start, r.rank))

    def _log(self, ctx: StepContext, records: list[TaskRecord]) -> None:
        """One ``"task"`` event per record, from the caller's thread (its structlog context applies)."""
        labels = ctx.labels
        if not labels.log_tasks:
            return
        self.events.emit("task", (
            {"step": self.steps, "schedule": labels.schedule, **record.as_dict(),
             "start": record.start - labels.clock_offset, "end": record.end - labels.clock_offset}
            for record in records
        ))

    async def _watchdog(
        self,
        plan: Sequence[Sequence[Action]],
        ctx: StepContext,
        outcomes: dict[int, _RankOutcome],
        stalled: list[StepStalled],
        scope: anyio.CancelScope,
    ) -> None:
        """Abort the step once no task has finished for ``stall_timeout`` seconds.

        Checking a counter a few times per timeout costs nothing per task. On a
        stall the mailbox is aborted, which frees every rank that waits for an
        input; a rank stuck inside a task (user code that never returns) cannot
        be interrupted, so after a grace period the pipeline is marked unusable
        rather than hanging the caller.
        """
        timeout = float(self.stall_timeout)  # type: ignore[arg-type]
        interval = min(1.0, timeout / 4)
        done, since = -1, time.perf_counter()
        while True:
            await anyio.sleep(interval)
            now = time.perf_counter()
            finished = sum(len(o.records) for o in outcomes.values())
            if finished != done:
                done, since = finished, now
                continue
            if now - since >= timeout:
                break
        error = _diagnose(plan, ctx, outcomes, now - since)
        ctx.mailbox.abort()
        with anyio.move_on_after(min(timeout, 10.0)):
            for outcome in outcomes.values():
                await outcome.done.wait()
        for rank, outcome in outcomes.items():
            if not outcome.returned.is_set():
                at = len(outcome.records)
                task = f"rank {rank}'s {plan[rank][at]}" if at < len(plan[rank]) else f"rank {rank}'s job"
                self._fence_stuck(ctx, rank, task, outcome)
        stalled.append(error)
        scope.cancel()

    def _fence_stuck(self, ctx: StepContext, rank: int, task: str, outcome: _RankOutcome) -> None:
        """``task`` is stuck in user code: refuse steps, and discard its ``.grad`` writes, until it returns.

        The caller rolls ``.grad`` back once the step raises; a backward that
        returns later would still accumulate into the restored gradients. The
        fence on the rank's parameters diverts those writes (see
        :class:`~pipesched.runtime.step_effects.GradientFence`); it is lifted by the
        worker thread the moment the task returns.
        """
        parameters = [
            p for stage, owner in zip(ctx.layout.stages, ctx.layout.placement)
            if owner == rank and stage is not None for p in stage.parameters()
        ]
        outcome.when_returned(GradientFence(parameters, task).lift)
        self._stuck.append((task, outcome.returned))

    def _job(self, ctx: StepContext, worker: Worker, actions: Sequence[Action], outcome: _RankOutcome,  # type: ignore[no-untyped-def]
             fence: StreamFence, finish: _Countdown):
        rank = worker.rank

        def job() -> None:
            fence.rank_begins(worker.device, worker.stream)
            try:
                with ctx.caller.job_scope():
                    run_rank(ctx, rank, actions, outcome.records)
            except BaseException as error:  # noqa: BLE001 - delivered to the caller below
                outcome.failed_time = time.perf_counter()
                ctx.mailbox.abort()
                outcome.error = error
                if not isinstance(error, StepAborted):
                    done = len(outcome.records)
                    action = actions[done] if done < len(actions) else None
                    _annotate(error, action, rank)
            finally:
                fence.rank_ends(worker.stream)
                outcome.leave()
                finish.count_down()

        return job

    def close(self) -> None:
        """Stop the workers and the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self.workers:
            worker.close(timeout=10)
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stop.set)
        self._loop_thread.join(timeout=10)


def _diagnose(
    plan: Sequence[Sequence[Action]], ctx: StepContext, outcomes: dict[int, _RankOutcome], quiet: float
) -> StepStalled:
    """Say, per unfinished rank, what its current action waits for, or that it is running."""
    at = {rank: plan[rank][len(o.records)] for rank, o in outcomes.items()
          if not o.returned.is_set() and len(o.records) < len(plan[rank])}
    waiting, parts = [], []
    for rank, action in sorted(at.items()):
        blockers = tuple(
            transfer.producer for transfer, slot in ctx.mailbox.incoming(action) if not slot.ready
        )
        waiting.append((rank, action, blockers))
        if blockers:
            parts.append(f"rank {rank} at {action} waits for {', '.join(map(str, blockers))}")
        else:
            parts.append(f"rank {rank} is running {action}")
    message = (
        f"step made no progress for {quiet:.1f} s (stall_timeout): " + "; ".join(parts)
        + ". A task that legitimately takes longer needs a larger stall_timeout."
    )
    return StepStalled(message, waiting)


def _annotate(error: BaseException, action: Action | None, rank: int) -> None:
    if action is None:
        note = f"pipesched: raised on rank {rank}"
    else:
        kind = {"F": "forward", "B": "backward", "W": "weight-gradient"}.get(action.kind, action.kind)
        note = (
            f"pipesched: raised in {kind} {action} (stage {action.stage}, "
            f"micro-batch {action.microbatch}) on rank {rank}"
        )
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10: keep the note where 3.11's traceback would look for it
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]
