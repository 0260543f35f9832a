"""Which forwards draw random numbers: trusted exact classes, else a dispatch-level watcher.

Replaying a checkpointed forward exactly needs every draw it makes to come
from its own seeded stream (:mod:`pipesched.runtime.rng`). Seeding costs a
lock that serialises the forwards of the ranks sharing a generator, so it is
paid only by forwards that draw. Knowing which do must not depend on a list
of function names: that fails open (``nn.LSTM``'s inter-layer dropout is drawn
inside the C++ ``lstm`` op; ``torch.ops.aten.bernoulli.p`` is named
``bernoulli.p``). So:

* A stage made only of layers of *exactly* a class known not to draw, or not
  to draw in its current state (dropout in eval mode or with p=0), without
  forward hooks, is not watched. No subclasses: a subclass may draw in any
  method it overrides, e.g. ``_conv_forward``.
* Any other forward runs under :class:`Watcher`, a thread-local
  ``TorchDispatchMode``. It sits below autograd and composite ops, so it sees
  every ATen kernel the forward runs (``lstm`` and ``dropout`` arrive as their
  ``bernoulli_``), and it asks torch itself whether a kernel draws: the
  ``nondeterministic_seeded`` tag that torch puts on every op consuming a
  generator (every op with a ``Generator`` argument has it, and so does
  Inductor's ``prims.inductor_seeds``; a test checks that on each torch
  version). The first such kernel seeds the generators right then.

A kernel that draws without the tag (a custom op registered without it) is
not seen; the generator backstop in :mod:`pipesched.runtime.rng` fails loudly
on it instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._ops import HigherOrderOperator
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipesched.runtime.generators import Held

_QUIET_CLASSES: set[type[nn.Module]] = {
    nn.Sequential, nn.Identity, nn.Linear, nn.Bilinear, nn.LazyLinear, nn.Flatten, nn.Unflatten,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.LogSigmoid, nn.GLU, nn.Tanhshrink,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Softmax2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.Embedding, nn.EmbeddingBag,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    nn.ModuleList, nn.ModuleDict, nn.modules.linear.NonDynamicallyQuantizableLinear,
    nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
}


def _dropout_off(m: Any) -> bool:
    return not m.training or m.p == 0


def _own_draws_only_through_children(m: Any) -> bool:
    """A transformer layer draws only through its dropout children, unless its activation
    is a function other than relu/gelu (an ``activation=`` callable may draw)."""
    return isinstance(m.activation, nn.Module) or m.activation in (F.relu, F.gelu)


#: Exact classes quiet in some states: dropout switched off (eval mode or p=0), a
#: transformer layer whose own code calls nothing that draws. Asked at every step.
_QUIET_WHEN: dict[type[nn.Module], Callable[[Any], bool]] = {
    **{cls: _dropout_off for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                      nn.FeatureAlphaDropout)},
    nn.MultiheadAttention: lambda m: not m.training or m.dropout == 0,
    nn.RReLU: lambda m: not m.training,
    nn.TransformerEncoderLayer: _own_draws_only_through_children,
    nn.TransformerDecoderLayer: _own_draws_only_through_children,
}


def declare_quiet(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare that modules of exactly ``cls`` (not its subclasses) never draw random numbers.

    Stages made only of such modules run unwatched. For pipesched's own
    layers (deferred batch norm); a wrong declaration breaks replay.
    Returns ``cls``, so it can decorate a class.
    """
    _QUIET_CLASSES.add(cls)
    return cls


def _quiet(m: nn.Module) -> bool:
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    cls = type(m)
    if cls in _QUIET_CLASSES:
        return True
    when = _QUIET_WHEN.get(cls)
    return when is not None and when(m)


def draws_nothing(stage: nn.Module | None) -> bool:
    """Whether ``stage`` is built only of exact quiet classes, without hooks (``None``: not here).

    Asked at the start of every step, so a dropout layer put in eval mode (or
    its ``p`` set to 0) counts as quiet from the next step on. Forward hooks,
    the module's own or global ones, may draw, so a hooked layer is not trusted.
    """
    if stage is None:
        return True
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    declared = getattr(stage, "draws_random", None)
    if isinstance(declared, bool) and not (stage._forward_hooks or stage._forward_pre_hooks):
        return not declared  # a traced stage has read every call of its graph (see call_draws)
    return all(_quiet(m) for m in stage.modules())


# ---------------------------------------------------------------- which kernels draw

_SEEDED = torch.Tag.nondeterministic_seeded
#: Schema arguments whose value switches a seeded kernel's draw off (``train=False``,
#: ``dropout_p=0``): SDPA's CPU kernel and rrelu carry the tag but draw nothing with
#: them. Counting such a call as a draw would only cost the lock; not counting one
#: that does draw is caught by the backstop.
_OFF: dict[str, object] = {"train": False, "training": False, "dropout_p": 0.0}
_Switch = tuple[int, str, object, object]  # position, name, default, value that means "no draw"
_switches: dict[Any, tuple[_Switch, ...] | None] = {}


def _draw_switches(op: Any) -> tuple[_Switch, ...] | None:
    """``None`` if ``op`` never draws, else its switches (often none)."""
    try:
        return _switches[op]
    except KeyError:
        pass
    tags = getattr(op, "tags", ())
    if _SEEDED not in tags:
        found = None
    else:
        found = tuple((i, a.name, a.default_value if a.has_default_value() else None, _OFF[a.name])
                      for i, a in enumerate(op._schema.arguments) if a.name in _OFF)
    _switches[op] = found
    return found


def kernel_draws(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether running ATen kernel ``op`` on these arguments draws from torch's generators."""
    switches = _draw_switches(op)
    if switches is None:
        return False
    for position, name, default, off in switches:
        value = kwargs[name] if name in kwargs else args[position] if position < len(args) else default
        if value is not None and not isinstance(value, torch.Tensor) and value == off:
            return False
    return True


def call_draws(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call of a traced graph (an ``fx`` ``call_function`` node) may draw random numbers.

    An ATen kernel is asked as at dispatch (:func:`kernel_draws`; an argument
    that is another node's value, not a constant, cannot switch a draw off).
    Python's ``operator`` functions (``getitem``, size arithmetic) never draw.
    Anything else, a higher-order op whose body is another graph included, is
    counted as drawing: that costs only the seeding, never a missed draw.
    """
    if isinstance(target, torch._ops.OpOverload):
        return kernel_draws(target, args, kwargs)
    return getattr(target, "__module__", None) not in ("_operator", "operator")


class Watcher(TorchDispatchMode):
    """Seeds the generators (``seeding``) at the first drawing kernel a forward runs.

    Nothing was drawn before that kernel in this forward, so the forward draws
    exactly what one seeded from its start would. Thread-local, like every
    dispatch mode: it watches only the worker that entered it.
    """

    #: Higher-order ops (``torch.cond``, eager ``flex_attention``, ...) come here too instead of
    #: failing; their inner kernels run below this mode, unseen, so one counts as a draw.
    supports_higher_order_operators = True

    def __init__(self, seeding: Held):
        super().__init__()
        self.seeding = seeding
        self.fired = False

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let Dynamo compile under it (else a compiled stage falls back to eager while watched)."""
        return True

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Keep torch from wrapping ``__torch_dispatch__`` in ``_disable_dynamo``: that wrapper imports
        ``torch._dynamo`` at the first kernel, some 2-3 s in a process's first step (long enough to
        trip a short ``stall_timeout``). :meth:`__torch_dispatch__` skips Dynamo itself, once it is
        loaded, which is the only time it could trace the watcher."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:  # not loaded, so nothing is compiling: no frame to keep from it
            return self._watch(func, args, kwargs or {})
        return _dynamo_disabled(dynamo)(self, func, args, kwargs or {})

    def _watch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.fired and (isinstance(func, HigherOrderOperator) or kernel_draws(func, args, kwargs)):
            self.seeding.__enter__()
            self.fired = True
        return func(*args, **kwargs)

    def release(self) -> None:
        """Put the live generator states back and release them, if the watcher seeded."""
        if self.fired:
            self.seeding.__exit__(None, None, None)


_DISABLED: list[Callable[..., Any]] = []


def _dynamo_disabled(dynamo: Any) -> Callable[..., Any]:
    """``Watcher._watch`` kept out of Dynamo's tracing, as torch does for every dispatch mode (made once)."""
    if not _DISABLED:
        _DISABLED.append(dynamo.disable(Watcher._watch, recursive=True))
    return _DISABLED[0]
