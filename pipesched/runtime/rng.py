"""Random numbers that do not depend on thread timing: one stream per (stage, micro-batch) forward.

All CPU ranks of a process share torch's one CPU generator, and ranks that
share a CUDA device share its generator. Drawing from them in whatever order
the worker threads get there makes dropout masks depend on timing: two runs
with the same ``torch.manual_seed`` differ, schedules are not comparable, and
a checkpointed forward's recompute could see other draws than its first run.

The rule here:

* At the start of a step, one 62-bit *step seed* is drawn from the caller's
  CPU generator (one draw, so consecutive steps differ and a seeded run
  repeats). Nothing is drawn when no stage can draw.
* Every forward of (stage, micro-batch) that draws runs with the process's
  generators (CPU, and its CUDA device's) re-seeded to
  :func:`forward_seed` ``(step seed, stage, micro-batch)``, holding their
  locks, and puts the live generator states back afterwards. Its masks are
  therefore a function of (step seed, stage, micro-batch) only: identical on
  every rerun, under every schedule with the same balance, and in the
  recompute of a checkpointed forward, which simply runs seeded again. No
  generator state needs to be kept between a forward and its recompute.

Stages that draw nothing must not pay for the lock, since it serialises the
forwards of the ranks that take it:

* A stage built only from ``torch.nn`` layers known not to draw (Linear,
  convolutions, activations other than RReLU, norms, pooling, embeddings, ...;
  their classes' own ``forward``, no hooks) runs as is.
* A stage that declares ``draws_random = False`` runs as is too: a traced
  stage (:mod:`pipesched.runtime.model_cut`) knows every op of its graph.
* Any other stage runs under a *tripwire*: a thread-local
  ``TorchFunctionMode`` that watches for random functions (dropout, rand,
  bernoulli, ...). The first one it sees takes the locks and seeds the
  generators right then, before the draw: nothing was drawn before it in that
  forward, so the draws are the same as if the whole forward had run seeded.
  From then on the stage is known to draw and its forwards are seeded up
  front (no tripwire cost). A stage that starts drawing late (input-dependent
  dropout, a module switched to training later) is caught the same way, so
  replay is exact whatever the first forwards did.

CUDA devices each have their own generator and lock; a stage on a CUDA device
seeds both its device's generator and the CPU one, taking the CPU lock first
(one global order, so two locks never deadlock).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

T = TypeVar("T")

_CPU_LOCK = threading.RLock()  # reentrant: a compiled stage re-takes it inside a drawing forward
_CUDA_LOCKS: dict[int, threading.RLock] = {}
_CUDA_LOCKS_GUARD = threading.Lock()
_MASK64 = (1 << 64) - 1


def _locks(device: torch.device) -> list[threading.RLock]:
    if device.type != "cuda":
        return [_CPU_LOCK]
    with _CUDA_LOCKS_GUARD:
        lock = _CUDA_LOCKS.setdefault(device.index, threading.RLock())
    return [_CPU_LOCK, lock]  # always CPU first: one global order, no lock-order deadlock


def _mix(value: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints that scatters nearby inputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def forward_seed(step_seed: int, stage: int, microbatch: int) -> int:
    """The generator seed of (stage, micro-batch)'s forward in the step seeded ``step_seed``."""
    return _mix(_mix(_mix(step_seed) ^ stage) ^ (microbatch << 20)) >> 1  # < 2**63: manual_seed's range


def draw_step_seed() -> int:
    """One draw from the caller's CPU generator: the seed of a step's random streams."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64).item())


# ---------------------------------------------------------------- which layers draw

_QUIET_CLASSES: tuple[type[nn.Module], ...] = (
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
)
_QUIET_FORWARDS: set[Callable[..., Any]] = {cls.forward for cls in _QUIET_CLASSES}


def trust_forward(forward: Callable[..., Any]) -> None:
    """Declare a module ``forward`` function as never drawing random numbers.

    Stages made only of such modules skip the tripwire. Used for pipesched's
    own layers (deferred batch norm); a wrong declaration breaks replay.
    """
    _QUIET_FORWARDS.add(forward)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def draws_nothing(stage: nn.Module | None) -> bool:
    """Whether ``stage`` is built only of layers known not to draw (``None``: not here).

    Forward hooks, the module's own or global ones, may draw, so a hooked
    layer is not trusted.
    """
    if stage is None:
        return True
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    declared = getattr(stage, "draws_random", None)
    if isinstance(declared, bool) and not _has_hooks(stage):
        return not declared  # a traced stage knows every op it runs (pipesched.runtime.model_cut)
    return all(type(m).forward in _QUIET_FORWARDS and not _has_hooks(m) for m in stage.modules())


_RANDOM_NAMES = frozenset({
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "alpha_dropout_",
    "feature_dropout", "feature_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_",
    "native_dropout", "_fused_dropout", "fused_dropout", "rrelu", "rrelu_", "rrelu_with_noise",
    "rrelu_with_noise_", "bernoulli", "bernoulli_", "multinomial", "normal", "normal_", "poisson",
    "binomial", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "gumbel_softmax",
    "_standard_gamma", "_sample_dirichlet", "scaled_dot_product_attention",
})
#: Random functions that draw only when an argument says so:
#: (position, keyword, default, value that means "no draw").
_CONDITIONAL: dict[str, tuple[int, str, object, object]] = {
    **{name: (2, "training", True, False) for name in (
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")},
    "rrelu": (3, "training", False, False),
    "scaled_dot_product_attention": (4, "dropout_p", 0.0, 0.0),
}
_names: dict[Any, str] = {}


def _name(func: Any) -> str:
    try:
        return _names[func]
    except (KeyError, TypeError):
        name = getattr(func, "__name__", "")
        if isinstance(func, torch._ops.OpOverload):  # a traced graph's aten.dropout.default: "dropout"
            name = func.overloadpacket.__name__
        with contextlib.suppress(TypeError):
            _names[func] = name
        return name


def _is_random(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether calling ``func(*args, **kwargs)`` may draw random numbers (conservatively)."""
    name = _name(func)
    if name not in _RANDOM_NAMES:
        return False
    condition = _CONDITIONAL.get(name)
    if condition is None:
        return True
    position, keyword, default, off = condition
    value = kwargs.get(keyword, args[position] if len(args) > position else default)
    return not (isinstance(value, (bool, float, int)) and value == off)


def may_draw(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a traced graph's call ``func(*args, **kwargs)`` may draw random numbers (conservatively).

    An aten op torch marks as seeded counts too, unless a rule here clears
    this call (``scaled_dot_product_attention`` with ``dropout_p=0.0``).
    """
    if _is_random(func, args, kwargs):
        return True
    return bool(getattr(func, "_nondeterministic_seeded", False)) and _name(func) not in _CONDITIONAL


class _Seeding:
    """Holds the generator locks and the live states of one seeded forward."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.seed = seed
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Seeding:
        for lock in _locks(self.device):
            self._stack.enter_context(lock)
        cpu = torch.get_rng_state()
        self._stack.callback(torch.set_rng_state, cpu)
        torch.default_generator.manual_seed(self.seed)
        if self.device.type == "cuda":
            cuda = torch.cuda.get_rng_state(self.device)
            self._stack.callback(torch.cuda.set_rng_state, cuda, self.device)
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self.seed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()  # live states back, then the locks, in reverse order


class _Tripwire(TorchFunctionMode):
    """Seeds the generators at the first random function a forward calls (thread-local mode)."""

    def __init__(self, device: torch.device, seed: int):
        super().__init__()
        self.seeding = _Seeding(device, seed)
        self.fired = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self.fired and _is_random(func, args, kwargs or {}):
            self.seeding.__enter__()
            self.fired = True
        return func(*args, **(kwargs or {}))

    def release(self) -> None:
        if self.fired:
            self.seeding.__exit__(None, None, None)


class RandomStreams:
    """Which stages of a pipeline draw (per training mode), learned over its lifetime."""

    def __init__(self) -> None:
        self._drawing: set[tuple[int, bool]] = set()
        self._lock = threading.Lock()

    def known_to_draw(self, stage: int, training: bool) -> bool:
        return (stage, training) in self._drawing

    def learn(self, stage: int, training: bool) -> None:
        with self._lock:
            self._drawing.add((stage, training))

    def step(
        self, stages: Sequence[nn.Module | None], devices: Sequence[torch.device], training: Sequence[bool]
    ) -> StepRandom:
        """The random streams of one step; draws its seed from the caller's generator if needed.

        ``devices[s]`` and ``training[s]``: where stage ``s`` runs and whether it is in training mode.
        """
        quiet = [draws_nothing(stage) for stage in stages]
        seed = None if all(quiet) else draw_step_seed()
        return StepRandom(self, seed, quiet, list(devices), list(training))


class StepRandom:
    """Runs the forwards of one step on their own random streams (first runs and recomputes alike)."""

    def __init__(self, streams: RandomStreams, seed: int | None, quiet: list[bool],
                 devices: list[torch.device], training: list[bool]):
        self.streams = streams
        self.seed = seed
        self.quiet = quiet
        self.devices = devices
        self.training = training

    def run(self, stage: int, microbatch: int, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (a forward of ``stage`` on ``microbatch``) on that pair's random stream."""
        if self.seed is None or self.quiet[stage]:
            return fn(*args)
        device, training = self.devices[stage], self.training[stage]
        seed = forward_seed(self.seed, stage, microbatch)
        if self.streams.known_to_draw(stage, training):
            with _Seeding(device, seed):
                return fn(*args)
        tripwire = _Tripwire(device, seed)
        try:
            with tripwire:
                return fn(*args)
        finally:
            tripwire.release()
            if tripwire.fired:
                self.streams.learn(stage, training)


@contextlib.contextmanager
def holding_generators(device: torch.device) -> Iterator[None]:
    """Hold the generator locks of ``device`` (tests use it to check nothing keeps them)."""
    with contextlib.ExitStack() as stack:
        for lock in _locks(device):
            stack.enter_context(lock)
        yield


def generators_held(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Hold the locks of the generators a forward on ``device`` draws from (reentrant).

    For code that moves the process-wide generators without drawing: Dynamo
    saves and restores them around every compilation, which would rewind the
    draws of a forward running on another rank meanwhile (see
    :mod:`pipesched.runtime.compiling`).
    """
    return holding_generators(device)
