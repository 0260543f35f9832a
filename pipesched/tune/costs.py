"""What a profile says about a model: per-layer measurements, their per-stage sums, JSON.

:class:`Profile` is data only (no torch), so a profile taken once, or on the
target GPU, is saved with :meth:`Profile.to_json` and reused anywhere
(``pipesched.tune(..., profile=Profile.from_json(text))``).
:func:`pipesched.profile` (:mod:`pipesched.tune.measure`) measures one.

Bytes follow the checkpoint manager's meter (:mod:`pipesched.runtime.checkpoint`),
so a stage's predicted activation bytes are what ``pipe.last_report``
measures: the distinct tensors autograd saves for backward, parameters and
buffers excluded, plus the stage input the manager always keeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["LayerProfile", "Profile", "StageCost"]

_FORMAT = "pipesched.profile/1"


@dataclass(frozen=True)
class LayerProfile:
    """One layer of the ``nn.Sequential``, measured at ``Profile.rows`` rows. Seconds and bytes.

    * ``forward_s``: its forward (the last layer's includes ``loss_fn`` when one was given);
    * ``backward_input_s``: B of a split backward, the gradient of its input only
      (:func:`pipesched.runtime.split_backward.backward_input`);
    * ``backward_weight_s``: W of a split backward, its parameters' gradients (``WeightWork.run``);
    * ``backward_s``: its whole backward in one pass (what an unsplit B runs);
    * ``saved_bytes``: distinct tensors its forward saves for backward, its parameters excluded;
      ``saved_input_bytes`` / ``saved_output_bytes``: the part of them that is its input / its output
      (so that stage sums count a tensor two layers both save once);
    * ``input_bytes``, ``output_bytes``: its input's and output's tensors;
    * ``parameter_bytes``: its parameters and buffers; ``grad_bytes``: its parameters that require grad;
    * ``allocated_bytes``: CUDA only, the allocator's growth over the forward while its graph is
      held (outputs included); ``None`` on the CPU;
    * ``spread``: (slowest - fastest) / median of its timed runs (F + B + W + whole backward per
      run): how far the machine let the figures wander while it was measured.
    """

    index: int
    name: str
    forward_s: float
    backward_input_s: float
    backward_weight_s: float
    backward_s: float
    saved_bytes: int
    saved_input_bytes: int
    saved_output_bytes: int
    input_bytes: int
    output_bytes: int
    parameter_bytes: int
    grad_bytes: int
    allocated_bytes: int | None = None
    spread: float = 0.0

    @property
    def internal_bytes(self) -> int:
        """Saved bytes that are neither its input nor its output (intermediate results)."""
        return max(0, self.saved_bytes - self.saved_input_bytes - self.saved_output_bytes)


@dataclass(frozen=True)
class StageCost:
    """A run of layers as one stage: summed times, and bytes as the checkpoint manager counts them.

    * ``forward_s``, ``backward_s`` (whole backward), ``backward_input_s`` / ``backward_weight_s``
      (split B / W). For the first stage when the pipeline input needs no gradient, B has
      nothing to compute (no input path) and W does the whole backward.
    * ``activation_bytes``: what one micro-batch holds from its F to its backward when not
      checkpointed: the stage input plus every distinct tensor its layers save.
    * ``input_bytes``: what it holds when checkpointed (the stage input only); its backward then
      rebuilds ``activation_bytes - input_bytes`` for the time of the backward.
    * ``output_bytes``: the stage output's tensors (its gradient, the same size, is what a split
      backward keeps from B to W besides the activations).
    * ``parameter_bytes`` / ``grad_bytes``: the stage's parameters and buffers / their gradients.
    * ``saves_input``: its first layer saves the stage input for backward.
    """

    forward_s: float
    backward_s: float
    backward_input_s: float
    backward_weight_s: float
    activation_bytes: int
    input_bytes: int
    output_bytes: int
    parameter_bytes: int
    grad_bytes: int
    saves_input: bool = False

    @property
    def step_s(self) -> float:
        """F + whole backward: the stage's work per micro-batch."""
        return self.forward_s + self.backward_s


@dataclass(frozen=True)
class Profile:
    """Per-layer costs of a model at one micro-batch size (``rows``), from :func:`pipesched.profile`.

    ``input_requires_grad``: whether the profiled input needed a gradient (it decides whether
    the first stage's backward has an input path). ``loss``: the last layer's figures include
    ``loss_fn``. ``repeat``: timed runs per layer (figures are their medians).
    """

    rows: int
    device: str
    repeat: int
    input_requires_grad: bool
    loss: bool
    layers: list[LayerProfile] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def spread(self) -> float:
        """The median of the layers' :attr:`LayerProfile.spread`: the profile's noise, in one figure."""
        values = sorted(layer.spread for layer in self.layers)
        return values[len(values) // 2] if values else 0.0

    def layer_costs(self, *, recompute: bool = False) -> list[float]:
        """Per layer: forward + whole backward seconds (+ one more forward when ``recompute``)."""
        return [(2 if recompute else 1) * layer.forward_s + layer.backward_s for layer in self.layers]

    def stage(self, first: int, stop: int, *, first_stage: bool | None = None) -> StageCost:
        """Layers ``first .. stop-1`` as one stage (``first_stage``: default ``first == 0``)."""
        if not 0 <= first < stop <= len(self.layers):
            raise ValueError(f"layers {first}..{stop - 1} are not a stage of a {len(self.layers)}-layer profile")
        layers = self.layers[first:stop]
        is_first = first == 0 if first_stage is None else first_stage
        whole = math.fsum(layer.backward_s for layer in layers)
        if is_first and not self.input_requires_grad:
            b_in, b_w = 0.0, whole
        else:
            b_in = math.fsum(layer.backward_input_s for layer in layers)
            b_w = math.fsum(layer.backward_weight_s for layer in layers)
        held = layers[0].input_bytes + sum(layer.internal_bytes for layer in layers)
        for before, after in zip(layers, layers[1:]):  # the tensor between two layers, if either saves it
            held += max(before.saved_output_bytes, after.saved_input_bytes)
        held += layers[-1].saved_output_bytes
        return StageCost(
            forward_s=math.fsum(layer.forward_s for layer in layers),
            backward_s=whole,
            backward_input_s=b_in,
            backward_weight_s=b_w,
            activation_bytes=held,
            input_bytes=layers[0].input_bytes,
            output_bytes=layers[-1].output_bytes,
            parameter_bytes=sum(layer.parameter_bytes for layer in layers),
            grad_bytes=sum(layer.grad_bytes for layer in layers),
            saves_input=layers[0].saved_input_bytes > 0,
        )

    def stages(self, balance: Sequence[int]) -> list[StageCost]:
        """:meth:`stage` for each stage of ``balance`` (layers per stage)."""
        if sum(balance) != len(self.layers):
            raise ValueError(f"balance {list(balance)} sums to {sum(balance)}, the profile has {len(self.layers)} layers")
        out, first = [], 0
        for count in balance:
            out.append(self.stage(first, first + count))
            first += count
        return out

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, **asdict(self)}

    def to_json(self) -> str:
        """The profile as JSON text; :meth:`from_json` reads it back to an equal profile."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a pipesched profile (expected \"format\": {_FORMAT!r}); "
                             f"make one with pipesched.profile(...).to_json()")
        names = {f.name for f in fields(LayerProfile)}
        try:
            layers = [LayerProfile(**{k: v for k, v in layer.items() if k in names}) for layer in data["layers"]]
            return cls(rows=int(data["rows"]), device=str(data["device"]), repeat=int(data["repeat"]),
                       input_requires_grad=bool(data["input_requires_grad"]), loss=bool(data["loss"]),
                       layers=layers)
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed pipesched profile: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> Profile:
        """Read a profile written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"profile JSON does not parse: {error}") from None
        return cls.from_dict(data)
