"""Argument checks and small rules shared by the single- and multi-process pipelines.

Each check names the argument, the value it got and what to pass instead.
"""

from __future__ import annotations

from pipesched.plan.registry import get_schedule
from pipesched.plan.schedule import Schedule


def check_chunks(chunks: object) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    return chunks


def check_stall_timeout(stall_timeout: object) -> float | None:
    if stall_timeout is None:
        return None
    if isinstance(stall_timeout, bool) or not isinstance(stall_timeout, (int, float)) or not stall_timeout > 0:
        raise ValueError(f"stall_timeout must be a number of seconds > 0 or None, got {stall_timeout!r}")
    return float(stall_timeout)


def check_loss_fn(loss_fn: object) -> None:
    """Refuse what would only fail inside a task: a loss class instead of a loss, a per-element loss."""
    if loss_fn is None:
        return
    if isinstance(loss_fn, type):
        name = ("nn." if loss_fn.__module__.startswith("torch.nn.") else "") + loss_fn.__qualname__
        raise TypeError(
            f"loss_fn is the class {name}, not a loss; pass an instance: loss_fn={name}()"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, target) -> scalar, got {loss_fn!r}")
    if getattr(loss_fn, "reduction", None) == "none":
        raise ValueError(
            f"loss_fn {loss_fn!r} has reduction='none', which returns one loss per element; the "
            f"pipeline needs a scalar: use reduction='mean' (the default) or reduction='sum'"
        )


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def resolve_schedule(schedule: object) -> Schedule:
    """A schedule instance from a registered name or an instance."""
    if isinstance(schedule, str):
        return get_schedule(schedule)
    if isinstance(schedule, Schedule):
        return schedule
    raise TypeError(
        f"schedule must be a registered name or a pipesched.Schedule, got {type(schedule).__name__}"
    )


def missing_loss_fn() -> ValueError:
    return ValueError(
        "step() needs a loss: build the pipeline with loss_fn=..., "
        "e.g. Pipeline(model, loss_fn=nn.CrossEntropyLoss())"
    )


def grad_disabled() -> RuntimeError:
    return RuntimeError(
        "step() computes gradients but was called with grad disabled (torch.no_grad()); "
        "call it outside no_grad, or use pipe(inputs) for inference"
    )
