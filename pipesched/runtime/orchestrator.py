"""Runs steps on one worker thread per rank; an anyio event loop in its own thread keeps the watchdog.

Per step the caller hands each rank's whole action list to that rank's worker
in one go (dispatch ahead) and then only waits: data passes rank to rank
through the mailbox without any other thread, and the last rank to finish (or
fail) wakes the caller directly. A step costs two thread hand-offs
(caller → workers → caller), not four through the loop: the loop's round trip
measured 273 µs per empty step against 20 µs for the direct one, 1.6 % of a
16 ms one-rank step.

The event loop lives in its own daemon thread for the pipeline's life and
runs the watchdog: it looks at the current step a few times per
``stall_timeout`` (a counter read, nothing per task) and aborts a step that
made no progress. ``step()`` never runs anything on the caller's own event
loop, so it works from plain training code and from code whose thread already
runs one (Jupyter, async trainers).

Failure: the failing worker aborts the step's mailbox itself (no round trip),
so every other rank stops at its next action boundary; the caller waits for
all of them — nothing is left running — and gets the original exception, type
and traceback intact, with a note naming the action, stage and micro-batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future

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


class _Step:
    """One running step: its ranks' outcomes, and the event the last of them sets for the caller.

    Only the last rank to return wakes the caller (one wake-up per step, not
    one per rank: each takes the GIL from the ranks still computing). The
    watchdog sets ``finished`` too when it gives up on a stalled step.
    """

    def __init__(self, ranks: Sequence[int], plan: Sequence[Sequence[Action]], ctx: StepContext):
        self.outcomes = {rank: _RankOutcome() for rank in ranks}
        self.plan = plan
        self.ctx = ctx
        self.finished = threading.Event()
        self.stalled: StepStalled | None = None
        self._left = len(self.outcomes)
        self._lock = threading.Lock()

    def count_down(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.finished.set()

    def progress(self) -> int:
        """Tasks finished so far (the watchdog compares it across its looks)."""
        return sum(len(o.records) for o in self.outcomes.values())

    def result(self) -> list[TaskRecord]:
        """Once finished: the records by start time, or the error that stopped the step."""
        if self.stalled is not None:
            raise self.stalled
        failed = [o for o in self.outcomes.values() if o.error is not None]
        errors = [o for o in failed if not isinstance(o.error, StepAborted)]
        if not failed:
            return sorted((r for o in self.outcomes.values() for r in o.records), key=lambda r: (r.start, r.rank))
        if errors:
            error = min(errors, key=lambda o: o.failed_time).error
        else:  # aborted from outside this process (a remote rank failed)
            error = self.ctx.mailbox.abort_reason or failed[0].error
        for outcome in failed:  # the other ranks' errors hold their tasks' frames (graphs): only one is raised
            outcome.error = None
        del failed, errors
        raise error  # type: ignore[misc]


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
        self._current: _Step | None = None  # the step the watchdog looks at
        self.steps = 0
        self.events = EventLog()  # this pipeline's structlog events; failures to log only warn

    @property
    def compute_streams(self) -> list[torch.cuda.Stream | None]:
        return [worker.stream for worker in self.workers]

    def _serve(self) -> None:
        """The loop thread: an anyio event loop (asyncio backend) that lives until close().

        It runs the watchdog (when there is a ``stall_timeout``); steps do not
        go through it (see the module docstring).
        """

        async def main() -> None:
            stop = anyio.Event()
            self._ready.set_result((asyncio.get_running_loop(), stop))
            async with anyio.create_task_group() as group:
                if self.stall_timeout is not None:
                    group.start_soon(self._watchdog)
                await stop.wait()
                group.cancel_scope.cancel()

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
        step = _Step(self.ranks, plan, ctx)
        try:
            fence.enter()
            self._dispatch(step, fence)
            self._current = step
            step.finished.wait()
        except BaseException:
            # An interruption (KeyboardInterrupt) may land anywhere here, even while
            # the jobs are being handed out: the step is aborted and every rank that
            # got its job is waited for, so no worker still writes into .grad when
            # the caller rolls back.
            ctx.mailbox.abort()
            self._current = step
            with contextlib.suppress(BaseException):
                step.finished.wait()
            raise
        finally:
            fence.exit()
            self._current = None
        try:
            records = step.result()
        except BaseException:
            ctx.checkpoint.discard()  # the failed step's graphs and pending W go now, not at the next step
            raise
        self._log(ctx, records)
        self.steps += 1
        return records

    def _dispatch(self, step: _Step, fence: StreamFence) -> None:
        """Hand every rank its action list, from the caller's thread.

        A rank whose job cannot be handed out (its worker is closed) fails the
        step: the ranks already running are aborted, and the rest count as
        returned, so the caller's wait ends once the running ones stop.
        """
        ctx = step.ctx
        handed = 0
        try:
            for worker in self.workers:
                rank = worker.rank
                worker.submit(self._job(ctx, worker, step.plan[rank], step.outcomes[rank], fence, step))
                handed += 1
        except BaseException as error:  # noqa: BLE001 - reported by step.result(), once the running ranks stopped
            ctx.mailbox.abort()  # the ranks already running would wait for the others forever
            for index, worker in enumerate(self.workers[handed:]):
                outcome = step.outcomes[worker.rank]
                outcome.error = error if index == 0 else StepAborted()
                outcome.failed_time = time.perf_counter()
                outcome.leave()
                step.count_down()
            if not isinstance(error, Exception):
                raise  # an interruption: run() waits for the running ranks, then re-raises

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

    async def _watchdog(self) -> None:
        """Abort the current step once no task of it has finished for ``stall_timeout`` seconds.

        Looking at a counter a few times per timeout costs nothing per task or
        per step. On a stall the mailbox is aborted, which frees every rank
        that waits for an input; a rank stuck inside a task (user code that
        never returns) cannot be interrupted, so after a grace period the
        pipeline is marked unusable rather than hanging the caller.
        """
        timeout = float(self.stall_timeout)  # type: ignore[arg-type]
        interval = min(1.0, timeout / 4)
        watched: weakref.ref[_Step] | None = None  # weak: a finished step's tensors must not wait for the next look
        done, since = -1, 0.0
        while True:
            await anyio.sleep(interval)
            step, now = self._current, time.perf_counter()
            if step is None or step.finished.is_set():
                watched = None
                continue
            finished = step.progress()
            if watched is None or watched() is not step or finished != done:
                watched, done, since = weakref.ref(step), finished, now
            elif now - since >= timeout:
                await self._give_up(step, now - since, timeout)
                watched = None
            del step

    async def _give_up(self, step: _Step, quiet: float, timeout: float) -> None:
        """Abort a stalled step, wait a grace period for its ranks, fence the stuck ones, wake the caller."""
        step.stalled = _diagnose(step.plan, step.ctx, step.outcomes, quiet)
        step.ctx.mailbox.abort()
        with anyio.move_on_after(min(timeout, 10.0)):
            while not all(o.returned.is_set() for o in step.outcomes.values()):
                await anyio.sleep(0.01)
        for rank, outcome in step.outcomes.items():
            if not outcome.returned.is_set():
                at = len(outcome.records)
                plan = step.plan
                task = f"rank {rank}'s {plan[rank][at]}" if at < len(plan[rank]) else f"rank {rank}'s job"
                self._fence_stuck(step.ctx, rank, task, outcome)
        step.finished.set()

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
             fence: StreamFence, step: _Step):
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
                step.count_down()

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
