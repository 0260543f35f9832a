"""The caller's thread-local autograd state, carried into the worker threads.

Grad mode, inference mode, autocast and saved-tensor hooks are thread-local in
PyTorch: a worker thread starts with none of what the training code set
around ``pipe.step()``. ``CallerState.capture()`` reads them on the caller's
thread; the workers re-enter them, so a stage behaves exactly as it would
without the pipeline.

* grad and inference mode wrap a rank's whole job;
* autocast wraps each stage call (and the loss), not the backward, as
  ``torch.autocast`` recommends;
* the caller's saved-tensor hooks (e.g. offloading saved activations) wrap
  every forward whose graph is kept; the checkpoint manager composes them
  with its byte meter (:mod:`pipesched.runtime.checkpoint`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

SavedTensorHooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


@dataclass(frozen=True)
class CallerState:
    grad_enabled: bool = True
    inference_mode: bool = False
    autocast: tuple[tuple[str, torch.dtype], ...] = ()
    saved_tensor_hooks: SavedTensorHooks | None = None

    @classmethod
    def capture(cls) -> CallerState:
        """Read the calling thread's state."""
        return cls(
            grad_enabled=torch.is_grad_enabled(),
            inference_mode=torch.is_inference_mode_enabled(),
            autocast=tuple(
                (device, torch.get_autocast_dtype(device))
                for device in ("cpu", "cuda")
                if torch.is_autocast_enabled(device)
            ),
            saved_tensor_hooks=torch._C._autograd._top_saved_tensors_default_hooks(False),
        )

    @contextlib.contextmanager
    def job_scope(self) -> Iterator[None]:
        """Grad and inference mode for a rank's whole job."""
        with contextlib.ExitStack() as stack:
            if self.inference_mode:
                stack.enter_context(torch.inference_mode())
            else:
                stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            yield

    @contextlib.contextmanager
    def call_scope(self) -> Iterator[None]:
        """Autocast for one stage call (and the loss computed right after it)."""
        if not self.autocast:
            yield
            return
        with contextlib.ExitStack() as stack:
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            yield
