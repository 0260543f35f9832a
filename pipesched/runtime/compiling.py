"""``torch.compile`` and pipelines: compile the stages, never the pipeline.

A pipeline's ``forward`` and ``step`` hand work to worker threads and wait on
queues and an event loop: nothing Dynamo can trace. ``torch.compile(pipe)``
used to fail deep inside Dynamo (``AssertionError: frozenset not in
co_names``), and ``torch.compile(pipe).step`` silently ran uncompiled. What is
worth compiling is each stage's computation, and each stage already runs on
its worker as one ordinary module call. So:

* ``pipe.compile(**options)`` compiles every stage in place
  (:func:`compile_stages`), with the options of ``torch.compile``;
* a pipeline entered from compiled code refuses at once with
  :func:`compile_refused`, which says that. The check sits inline at the top
  of ``forward`` and ``step``: ``torch.compiler.is_compiling()`` while Dynamo
  traces, then, when Dynamo gives up on the frame and runs it as plain Python,
  the eval-frame callback Dynamo still has installed (:data:`compile_callback`).
  It must stay inline: a helper function would itself be a frame Dynamo tries
  to trace.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pipesched.runtime.rng import generators_held

#: The callback Dynamo installs on a thread while compiled code runs; ``None`` or ``False`` otherwise.
compile_callback: Callable[[], Any] = getattr(
    getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None), "get_eval_frame_callback", lambda: None
)


def compile_refused(what: str) -> RuntimeError:
    """The error for ``torch.compile`` applied to a pipeline (or to code that calls one)."""
    return RuntimeError(
        f"torch.compile cannot trace a {what}: its steps run on worker threads. Compile its stages "
        f"instead: call pipe.compile(...) (same options as torch.compile; it compiles every stage "
        f"in place) and use the pipeline itself uncompiled, e.g. pipe.compile(mode='max-autotune'); "
        f"loss = pipe.step(x, y)"
    )


def compile_stages(stages: Sequence[nn.Module | None], devices: Sequence[torch.device],
                   *args: Any, **kwargs: Any) -> None:
    """Compile every stage (on ``devices[s]``) in place: ``torch.compile(*args, **kwargs)`` of its call.

    Like ``nn.Module.compile`` (the stage's ``__call__`` runs the compiled
    version), with three differences that matter here:

    * Dynamo starts tracing at a frame in this file and inlines the stage's
      call. ``nn.Module.compile`` starts at ``_call_impl``, a ``torch.nn``
      frame Dynamo does not start on, and then compiles nothing for a stage of
      built-in layers (``nn.Sequential(nn.Linear, ...)``); here each stage is
      one graph.
    * The pipeline meters what autograd saves with saved-tensor hooks (see
      :mod:`pipesched.runtime.checkpoint`). Called from inside compiled code, those
      Python hooks would be traced too, and recompiled for every new tensor
      until Dynamo's recompile limit. Each compiled call runs the hooks active
      around it with Dynamo disabled.
    * Dynamo saves the process-wide random generators before each compilation
      and restores them after. A rank compiling while a dropout stage draws on
      another rank would rewind those draws: the forward's mask would then no
      longer be the one its recompute replays (see :mod:`pipesched.runtime.rng`). So a
      compiled call holds the generators' locks, as a drawing forward does. The
      price: compiled stages on ranks sharing a generator (all CPU ranks) run
      one at a time, and on GPUs they launch their kernels one at a time.
    """
    _pin_fake_cuda_guard()
    for stage, device in zip(stages, devices):
        if stage is not None:
            compiled = torch.compile(_traced_from_here(stage), *args, **kwargs)
            stage._compiled_call_impl = _hooks_outside_dynamo(compiled, device)


_guard_pinned = threading.Event()


def _pin_fake_cuda_guard() -> None:
    """Install torch's fake CUDA device guard from a thread that outlives every worker.

    On a CUDA build of torch with no visible device (a CPU-only CI runner or
    laptop with the default wheel), Dynamo's fake-tensor mode installs a fake
    CUDA device guard the first time it is entered, and torch keeps that guard
    in a *thread-local* of whichever thread got there first, while publishing
    its address process-wide. Here that thread is a rank's worker: once the
    pipeline closes, the address dangles, and the next compilation in the
    process (the next compiled pipeline, or any ``torch.compile``) crashes
    with a segmentation fault (seen with torch 2.11's CUDA wheel). Entering it
    first from the main thread, or else from a parked thread that never exits,
    makes later calls find a live guard and leave it alone. A CPU build or a
    machine with a GPU never takes that path, and this does nothing there.
    """
    if _guard_pinned.is_set():
        return
    ensure = getattr(torch._C, "_ensureCUDADeviceGuardSet", None)
    if ensure is None or not torch.cuda._is_compiled() or torch.cuda.is_available():
        _guard_pinned.set()
        return
    if threading.current_thread() is threading.main_thread():
        ensure()
        _guard_pinned.set()
        return

    def keep() -> None:
        ensure()
        _guard_pinned.set()
        threading.Event().wait()  # never returns: the guard lives in this thread's locals

    threading.Thread(target=keep, name="pipesched-cuda-guard", daemon=True).start()
    _guard_pinned.wait()


def _traced_from_here(stage: nn.Module) -> Callable[..., Any]:
    """A function of this file that calls the stage, with a code object of its own.

    Dynamo keeps compiled code, and counts recompilations against its limit
    (8), per code object: with one shared code object, the stages of every
    pipeline in the process (each in two grad modes) would evict each other
    and soon fall back to eager.
    """
    call = stage._call_impl

    def stage_call(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    return types.FunctionType(stage_call.__code__.replace(), stage_call.__globals__, stage_call.__name__,
                              None, stage_call.__closure__)


def _hooks_outside_dynamo(compiled: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        with generators_held(device):
            if hooks is None:
                return compiled(*args, **kwargs)
            pack, unpack = hooks
            with torch.autograd.graph.saved_tensors_hooks(torch.compiler.disable(pack), torch.compiler.disable(unpack)):
                return compiled(*args, **kwargs)

    return call
