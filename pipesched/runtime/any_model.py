"""``Pipeline(any_module, split_points=...)``: where the cut is, what it is traced with, and its guard.

:mod:`pipesched.runtime.model_cut` cuts a traced forward; this module decides
the rest, each choice refused loudly when it cannot hold:

* **split points**: the user's fully qualified module names (each the first
  module of a stage, torch's ``SplitPoint.BEGINNING``), or by default cuts
  in the model's block list, the longest ``nn.ModuleList`` of same-class
  blocks, balanced by parameter count or by ``balance=`` counted in blocks;
* **the trace inputs**: ``example_inputs`` (a dict of a few rows), or, for a
  Hugging Face language model, ``input_ids`` and ``attention_mask`` made
  from its config (a padded row included, so the mask path is the one traced);
* **the guard**: the cut and the model's own forward run one probe batch (and
  its first row alone, since the trace assumed >= 2 rows); the cut is refused,
  naming the architecture and the difference, if they disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.runtime.model_cut import (
    CutStage,
    ModelCutError,
    cut_exported,
    export_model,
    input_keys,
    trace_inputs,
)
from pipesched.runtime.partition import resolve_layout


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's block list: its longest ``nn.ModuleList`` whose entries are all of one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) >= 2
                and len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1]))):
            best = (name, module)
    if best is None:
        raise ModelCutError(
            f"split_points=None, but {type(model).__name__} has no block list (an nn.ModuleList of >= 2 "
            f"blocks of one class) to cut; give split_points=[...] naming the first module of each stage, or "
            f"an nn.Sequential of its layers"
        )
    return best


def balance_blocks(sizes: Sequence[int], stages: int) -> list[int]:
    """Blocks per stage, contiguous, minimising the largest stage's parameter count (earlier stages first)."""
    if stages > len(sizes):
        raise ModelCutError(f"cannot cut a block list of {len(sizes)} blocks into {stages} stages; "
                            f"give fewer devices or split_points=[...]")
    total = sum(sizes)
    best: list[int] = []
    low, high = max(sizes), total
    while low <= high:  # the smallest bound for which a greedy fill needs <= stages stages
        bound = (low + high) // 2
        counts, load = [0], 0
        for size in sizes:
            if load + size > bound and counts[-1]:
                counts.append(0)
                load = 0
            counts[-1] += 1
            load += size
        if len(counts) <= stages:
            best, high = counts, bound - 1
        else:
            low = bound + 1
    while len(best) < stages:  # split the largest stage of > 1 blocks until the count is right
        index = max((i for i, c in enumerate(best) if c > 1), key=lambda i: best[i])
        best[index:index + 1] = [best[index] - best[index] // 2, best[index] // 2]
    return best


def split_points_from_balance(name: str, balance: Sequence[int]) -> list[str]:
    """``["<list>.<first block of stage 1>", ...]`` for blocks per stage ``balance``."""
    points, first = [], 0
    for count in balance[:-1]:
        first += count
        points.append(f"{name}.{first}" if name else str(first))
    return points


def check_split_points(model: nn.Module, split_points: object) -> list[str]:
    """Validate ``split_points``: a non-empty list of distinct names of submodules of ``model``."""
    if isinstance(split_points, (str, bytes)) or not isinstance(split_points, Sequence) or not split_points:
        raise ModelCutError(f"split_points must be a non-empty list of module names, got {split_points!r}; "
                            f"e.g. split_points=['model.layers.2']")
    names = dict(model.named_modules())
    for index, point in enumerate(split_points):
        if not isinstance(point, str) or not point or point not in names:
            try:
                listed = block_list(model)[0]
                hint = f" (its blocks are {listed}.0 to {listed}.{len(block_list(model)[1]) - 1})"
            except ModelCutError:
                hint = ""
            raise ModelCutError(f"split_points[{index}] = {point!r} is not a submodule of "
                                f"{type(model).__name__}{hint}; name the first module of each new stage")
    if len(set(split_points)) != len(split_points):
        raise ModelCutError(f"split_points {list(split_points)} names a module twice; each begins one stage")
    return list(split_points)


def default_example_inputs(model: nn.Module) -> dict[str, Tensor]:
    """A probe batch for a Hugging Face-style language model: 2 rows x 8 tokens, the second right-padded."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ModelCutError(
            f"{type(model).__name__} is not an nn.Sequential and pipesched cannot guess its inputs; give "
            f"example_inputs={{'name': tensor, ...}} (a few rows of what pipe.step() will get), the keyword "
            f"arguments of its forward"
        )
    generator = torch.Generator().manual_seed(0)  # the caller's random stream is left alone
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (2, 8), generator=generator).to(device)
    mask = torch.ones(2, 8, dtype=torch.long, device=device)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _leaves(value: Any) -> list[Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, Tensor)]


class ModelCut:
    """Stages of any ``nn.Module``, traced once with dynamic batch and sequence dims and guarded.

    ``stages[0]`` takes the keyword inputs (a mapping), the others the
    previous stage's tuple; the last returns what ``model(**inputs)`` returns.
    """

    def __init__(self, model: nn.Module, split_points: Sequence[str], example_inputs: Mapping[str, Tensor] | None,
                 forward_kwargs: Mapping[str, Any] | None):
        self.split_points = check_split_points(model, split_points)
        self.training = model.training
        example = dict(example_inputs) if example_inputs is not None else default_example_inputs(model)
        if not example or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in example.items()):
            raise ModelCutError(f"example_inputs must be a non-empty dict of str to batch-first Tensors, "
                                f"got {example_inputs!r}")
        self.keys = tuple(example)
        self.traced_on = next(iter(example.values())).device
        self.forward_kwargs = dict(forward_kwargs or {})
        kwargs = trace_inputs(model, example, self.forward_kwargs)
        self._kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}
        program = export_model(model, kwargs)
        self.stages: list[CutStage] = cut_exported(model, program, self.split_points, kwargs)
        self._dims = self._traced_dims(program, kwargs)
        self._dtypes = {k: (v.dtype, v.dim()) for k, v in example.items()}
        self._probe(model, example)
        self._probe(model, {k: v[:1] for k, v in example.items()})

    @staticmethod
    def _traced_dims(program: torch.export.ExportedProgram,
                     kwargs: Mapping[str, Any]) -> dict[str, dict[int, tuple[int, float]]]:
        """Per input and dim, the sizes the trace holds for: ``(n, n)`` for a dim it fixed, else
        the symbol's range (export assumes >= 2: 0 and 1 are specialised)."""
        placeholders = {n.name: n for n in program.graph_module.graph.nodes if n.op == "placeholder"}
        names = program.graph_signature.user_inputs  # in the order of the flattened keyword inputs
        dims: dict[str, dict[int, tuple[int, float]]] = {}
        for key, name in zip(input_keys(program, kwargs), names, strict=True):
            node = placeholders.get(name) if isinstance(name, str) else None  # a constant input: its value
            val = node.meta.get("val") if node is not None else None
            if not isinstance(val, Tensor):
                continue
            dims[key] = {}
            for dim, size in enumerate(val.shape):
                if isinstance(size, int):
                    dims[key][dim] = (size, size)
                    continue
                bounds = program.range_constraints.get(size.node.expr)
                if bounds is None:  # a derived size: no range of its own, only the symbols it comes from
                    continue
                upper = bounds.upper if bounds.upper.is_finite else float("inf")
                dims[key][dim] = (int(bounds.lower), float(upper))
        return dims

    def check_inputs(self, inputs: object, training: bool) -> None:
        """Refuse, before any thread runs, inputs the traced graph was not made for.

        The trace also fixed the model's mode (dropout in or out), which
        ``model.train()``/``model.eval()`` cannot reach afterwards: a change is refused.
        """
        if training != self.training:
            mode = "training" if self.training else "eval"
            raise RuntimeError(
                f"the model was traced in {mode} mode and is now in {'training' if training else 'eval'} "
                f"mode; a traced cut keeps the mode it was traced in: put the model back in {mode} mode, or "
                f"build another Pipeline after model.{'train' if training else 'eval'}()"
            )
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs must be a dict of the model's keyword tensors {list(self.keys)} (the cut was traced "
                f"with those), got {type(inputs).__name__}; e.g. pipe.step({{'input_ids': ids, ...}}, labels)"
            )
        if tuple(sorted(inputs)) != tuple(sorted(self.keys)):
            raise ValueError(
                f"inputs has keys {sorted(inputs)}, but the cut was traced with {sorted(self.keys)}; pass "
                f"those keys, or build the Pipeline with example_inputs holding the keys you pass"
            )
        for key in self.keys:
            value = inputs[key]
            if not isinstance(value, Tensor):
                continue  # refused by the micro-batch split, naming the key
            if (value.dtype, value.dim()) != self._dtypes[key]:
                dtype, ndim = self._dtypes[key]
                raise ValueError(
                    f"inputs[{key!r}] is a {value.dim()}-dim {value.dtype} tensor, but the cut was traced with "
                    f"a {ndim}-dim {dtype} one; pass {dtype} (the traced graph bakes in what the forward did "
                    f"with that dtype), or build the Pipeline with example_inputs of the dtype you pass"
                )
            for dim, (lower, upper) in self._dims.get(key, {}).items():
                size = value.shape[dim] if value.dim() > dim else None
                if dim == 0 or size is None or lower <= size <= upper:
                    continue  # rows: micro-batches of 1 row were probed, more are in range
                held = f"is fixed to {lower}" if lower == upper else f"holds for sizes {lower} to {upper}"
                raise ValueError(
                    f"inputs[{key!r}] has size {size} in dim {dim}, but the traced forward {held} there "
                    f"(torch.export specialises sizes 0 and 1, and the model's code may fix a size); "
                    f"pass a size in that range"
                )

    def place(self, devices: Sequence[torch.device]) -> None:
        """Stage ``s`` creates its tensors on ``devices[s]`` (the stages' parameters are moved by the caller)."""
        for stage, device in zip(self.stages, devices):
            stage.retarget(self.traced_on, device)

    def run(self, inputs: Mapping[str, Tensor]) -> Any:
        """The stages one after another on one batch (what the pipeline computes, without it)."""
        value: Any = dict(inputs)
        for stage in self.stages:
            value = stage(value)
        return value

    def _probe(self, model: nn.Module, example: Mapping[str, Tensor]) -> None:
        """Refuse the cut if it and ``model(**example)`` disagree (buffers restored, RNG forked)."""
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
        try:
            with torch.no_grad():
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)
                    ours = self.run(example)
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)
                    theirs = model(**example, **self._kwargs)
        except ModelCutError:
            raise
        except Exception as error:  # noqa: BLE001 - the cut failed on the probe batch: refuse it
            raise ModelCutError(
                f"the cut of {type(model).__name__} at split_points={self.split_points} fails on a probe batch "
                f"of {next(iter(example.values())).shape[0]} row(s): {type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            ) from error
        finally:
            named = dict(model.named_buffers())
            for name, saved in buffers.items():
                named[name].copy_(saved)
        ours_leaves, theirs_leaves = _leaves(ours), _leaves(theirs)
        difference = _difference(ours_leaves, theirs_leaves)
        if difference is not None:
            raise ModelCutError(
                f"the cut of {type(model).__name__} at split_points={self.split_points} disagrees with the "
                f"model's own forward on a probe batch ({difference}); pipesched refuses a cut it cannot "
                f"trust. Give the model as an nn.Sequential of its layers instead"
            )


def _difference(ours: list[Tensor], theirs: list[Tensor]) -> str | None:
    """``None`` if the outputs agree to the dtype's rounding, else what differs."""
    if len(ours) != len(theirs):
        return f"{len(ours)} output tensors against {len(theirs)}"
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {index}: {tuple(a.shape)} {a.dtype} against {tuple(b.shape)} {b.dtype}"
        if a.is_floating_point():
            tolerance = 1e-10 if a.dtype == torch.float64 else 1e-4
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            gap = float((a - b).abs().max()) if a.numel() else 0.0
            if not gap <= tolerance * scale:  # NaN counts as a disagreement
                return f"output {index}: max |difference| {gap:.3g}"
        elif not torch.equal(a, b):
            return f"output {index}: values differ"
    return None


__all__ = ["ModelCut", "ModelCutError", "balance_blocks", "block_list", "check_split_points",
           "default_example_inputs", "split_points_from_balance"]


def check_cut_arguments(module: object, **arguments: Any) -> bool:
    """Whether ``module`` is an ``nn.Sequential`` (cut between layers), refusing arguments that do not fit it.

    ``split_points``, ``forward_kwargs`` and ``example_inputs`` are for a
    traced model; ``deferred_batch_norm`` replaces layers in place, which only
    an ``nn.Sequential``'s cut (sharing the layer objects) would see.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (an nn.Sequential, or any model cut at split_points=), "
                        f"got {type(module).__name__}")
    if isinstance(module, nn.Sequential):
        for name in ("split_points", "forward_kwargs", "example_inputs"):
            if arguments.get(name) is not None:
                raise ValueError(f"{name}={arguments[name]!r} is for models that are not an nn.Sequential; an "
                                 f"nn.Sequential is cut between its layers by balance=[...]")
        return True
    if arguments.get("deferred_batch_norm"):
        raise ValueError(f"deferred_batch_norm=True needs an nn.Sequential (its batch norms are replaced in "
                         f"place); {type(module).__name__} is traced with its own: pass deferred_batch_norm=False")
    return False


def resolve_cut(module: nn.Module, schedule: Any, split_points: object, balance: object,
                devices: Any) -> tuple[list[str], list[torch.device], list[int]]:
    """Split points, devices and units per stage for a model that is not an ``nn.Sequential``.

    Devices and units per stage follow the ``nn.Sequential`` rule
    (:func:`~pipesched.runtime.partition.resolve_layout`), where a unit is a
    stage (with ``split_points``) or a block of the block list (without).
    """
    if split_points is not None:
        if balance is not None:
            raise ModelCutError(
                f"both split_points={split_points!r} and balance={balance!r} were given; give split_points "
                f"(where each stage begins) or balance (blocks per stage), not both"
            )
        points = check_split_points(module, split_points)
        devices, units = resolve_layout(len(points) + 1, schedule, [1] * (len(points) + 1), devices)
        return points, devices, units
    name, blocks = block_list(module)
    if balance is not None:
        if (isinstance(balance, Sequence) and not isinstance(balance, (str, bytes))
                and all(isinstance(c, int) for c in balance) and sum(balance) != len(blocks)):
            raise ModelCutError(
                f"balance {list(balance)} sums to {sum(balance)}, but balance counts the blocks of {name} "
                f"({len(blocks)} blocks) for a model that is not an nn.Sequential; make it sum to {len(blocks)}"
            )
        devices, counts = resolve_layout(len(blocks), schedule, balance, devices)
    else:
        devices, even = resolve_layout(len(blocks), schedule, None, devices)
        counts = balance_blocks([sum(p.numel() for p in block.parameters()) for block in blocks], len(even))
    return split_points_from_balance(name, counts), devices, counts
