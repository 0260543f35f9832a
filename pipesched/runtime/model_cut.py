"""Any ``nn.Module`` in, stages out: cut the model's own traced forward at named modules.

Why tracing and not a hand-written extractor: what a model computes outside
its block list (an embedding multiplier, a logit softcap, the causal mask) is
where extractors go silently wrong. ``torch.export`` records the forward as
it is, so the stages compute exactly what ``model(**inputs)`` computes.

::

    model(**inputs)  --torch.export, dynamic batch and sequence dims-->  one aten graph
         |  nodes in execution order; each carries the module that ran it
         v
    stage 0 | stage 1 | ...   a stage begins at the first node of its split point's module

Rules of the cut, each there for a reason:

* **Parameters and buffers are the user's own objects**, looked up by fully
  qualified name (``get_attr`` targets are FQNs), never copies: gradients land
  in ``model.<name>.grad`` and a tied embedding/head stays one ``Parameter``,
  which the existing tied-weight paths handle (:mod:`pipesched.runtime.tied`).
* **What is a function of the inputs alone is recomputed, not sent.** The
  attention mask, position ids and every symbolic size depend on no
  parameter and no buffer, so each stage that needs them rebuilds them from
  the inputs, which travel as they came (the 2-D mask, never a
  ``(B, 1, T, T)`` tensor), and no Python ``int`` (a symbolic size) ever
  crosses a stage. What reads a buffer (rotary cos/sin from ``inv_freq``) is
  computed once, where the forward computes it, and sent like an activation:
  a buffer read by stages on two devices would be refused
  (:func:`~pipesched.runtime.partition.check_shared_parameters`), since
  forwards may update buffers in place.
* **Shapes stay dynamic**: batch and sequence dims are traced as symbols, so
  another batch size, sequence length or uneven micro-batches run with no
  rebuild. A dim the trace had to fix is checked on every call instead.
* **The user's model is never changed**: stages are new ``GraphModule``\\s
  holding references to its tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from pipesched.runtime.draw_detection import call_draws


class ModelCutError(ValueError):
    """The model cannot be cut as asked; the message names the argument, the value and the fix."""


def trace_inputs(model: nn.Module, inputs: Mapping[str, Tensor], forward_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments the cut traces ``model.forward`` with: ``inputs``, ``forward_kwargs``, no cache.

    A KV cache (``use_cache=True``, Hugging Face's default) returns a
    ``DynamicCache`` that is neither needed in training nor traceable, so
    ``use_cache=False`` is passed where ``forward`` takes it; asking for a
    cache is refused.
    """
    overlap = sorted(set(inputs) & set(forward_kwargs))
    if overlap:
        raise ModelCutError(f"forward_kwargs and the inputs both give {overlap}; give each argument once")
    for key, value in forward_kwargs.items():
        if isinstance(value, Tensor):
            raise ModelCutError(
                f"forward_kwargs[{key!r}] is a Tensor; tensors are batch inputs: pass them in the inputs dict "
                f"(pipe.step({{{key!r}: ...}}, targets)) so they are split into micro-batches"
            )
    kwargs = {**inputs, **forward_kwargs}
    if "use_cache" in inspect.signature(model.forward).parameters:
        if kwargs.get("use_cache"):
            raise ModelCutError(
                "forward_kwargs['use_cache'] = True: a pipelined forward keeps no KV cache; leave it out "
                "(pipesched passes use_cache=False) or set config.use_cache=False"
            )
        kwargs["use_cache"] = False
    return kwargs


def export_model(model: nn.Module, kwargs: Mapping[str, Any]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model(**kwargs)`` with every tensor's dims 0 and 1 dynamic, or a refusal.

    ``strict=False``: the forward runs as Python (as Hugging Face models expect), only torch ops are traced."""
    auto = torch.export.Dim.AUTO  # a size of 1 would be specialised anyway (with a warning): leave it static
    dynamic = {k: ({d: auto for d in range(min(2, v.dim())) if v.shape[d] > 1} if isinstance(v, Tensor) else None)
               for k, v in kwargs.items()}
    try:
        return torch.export.export(model, (), dict(kwargs), dynamic_shapes=dynamic, strict=False)
    except Exception as error:  # noqa: BLE001 - any tracing failure is the same refusal
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelCutError(
            f"{type(model).__name__} cannot be captured by torch.export, so pipesched cannot cut it: "
            f"{type(error).__name__}: {first}. Give the model as an nn.Sequential of its layers instead "
            f"(Pipeline(nn.Sequential(...), balance=...))"
        ) from error


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if isinstance(path, str)]


def _inside(path: str, split_point: str) -> bool:
    return path == split_point or path.startswith(split_point + ".")


def _replayable(node: fx.Node, owned: frozenset[str], free: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` is a function of the inputs alone (no parameter, no buffer of the model)
    and safe to run again, so that every stage needing it recomputes it."""
    if node.op == "placeholder":
        return True
    if node.op == "get_attr":
        return node.target not in owned  # a constant of the trace (each stage holds its own copy)
    if node.op != "call_function":
        return False
    target = node.target
    schema = getattr(target, "_schema", None)
    if getattr(target, "_nondeterministic_seeded", False) or (schema is not None and schema.is_mutable):
        return False  # random (dropout) or in place: running it twice would differ
    return all(free[n] for n in node.all_input_nodes)


class CutStage(nn.Module):
    """One stage of a cut model: a ``GraphModule`` plus how its input and output are shaped.

    Stage 0 takes the keyword inputs as a mapping and feeds the graph in the
    traced order (adding the fixed non-tensor ``forward_kwargs``); later
    stages take the previous stage's tuple. The last stage rebuilds the
    model's own output (a ``ModelOutput`` with ``logits``, a Tensor, ...).
    """

    def __init__(self, graph_module: fx.GraphModule, keys: Sequence[str] | None,
                 constants: Mapping[str, Any], out_spec: Any):
        super().__init__()
        self.graph = graph_module
        self._keys = list(keys) if keys is not None else None
        self._constants = dict(constants)
        self._out_spec = out_spec
        #: whether any call of the graph may draw random numbers: read by
        #: :func:`~pipesched.runtime.draw_detection.draws_nothing`, so a stage with none runs without the
        #: draw watcher (a Python call on every kernel)
        self.draws_random = any(n.op == "call_function" and call_draws(n.target, n.args, dict(n.kwargs))
                                for n in graph_module.graph.nodes)

    def forward(self, value: Any) -> Any:
        if self._keys is None:
            out = self.graph(*value)
        else:
            out = self.graph(*[value[k] if k in value else self._constants[k] for k in self._keys])
        if self._out_spec is None:
            return tuple(out)
        return pytree.tree_unflatten(list(out), self._out_spec)

    def retarget(self, traced_on: torch.device, device: torch.device) -> None:
        """Make the graph create its tensors on ``device`` where the trace recorded ``traced_on``.

        A trace bakes devices into its calls (``arange(..., device=cpu)``, the
        ``_assert_tensor_metadata`` checks): a stage placed elsewhere must
        name its own device, as the model's forward would if run there.
        """
        if _same_device(traced_on, device):
            return

        def swap(value: Any) -> Any:
            return device if isinstance(value, torch.device) and _same_device(value, traced_on) else value

        for node in self.graph.graph.nodes:
            node.args = pytree.tree_map(swap, node.args)
            node.kwargs = pytree.tree_map(swap, node.kwargs)
        self.graph.recompile()


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


_missing = object()


def _attribute(model: nn.Module, traced: nn.Module, target: str) -> Any:
    """The user's own tensor at ``target`` (an FQN), or ``_missing`` for a constant only the trace has."""
    owner, _, name = target.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
        found = getattr(module, name)
    except AttributeError:
        return _missing
    return found if isinstance(found, Tensor) else _missing


def _owned_by(model: nn.Module, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return name in module._parameters or name in module._buffers


def _buffers_written(node: fx.Node) -> list[str]:
    """The attributes ``node`` writes in place: arguments its schema marks written (``add_``), and a
    training-mode batch norm's running statistics (which ``aten.batch_norm`` updates unmarked)."""
    if node.op != "call_function":
        return []
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    written = [arg for spec, arg in zip(schema.arguments, node.args)
               if spec.alias_info is not None and spec.alias_info.is_write]
    if schema.name in ("aten::batch_norm", "aten::native_batch_norm") and len(node.args) > 5 and node.args[5]:
        written += list(node.args[3:5])
    return [str(arg.target) for arg in written if isinstance(arg, fx.Node) and arg.op == "get_attr"]


def _constant(traced: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(traced.get_submodule(owner) if owner else traced, name)


def cut_exported(model: nn.Module, program: torch.export.ExportedProgram, split_points: Sequence[str],
                 kwargs: Mapping[str, Any]) -> list[CutStage]:
    """Stages of ``program`` (an export of ``model(**kwargs)``), each beginning at its split point.

    A forward that updates buffers in place (batch-norm running statistics in
    training mode) is refused: the trace moves the update to the end of the
    graph, and a checkpointed stage's recompute would apply it a second time.
    """
    traced = program.module()
    graph = traced.graph
    mutated = sorted({*program.graph_signature.buffers_to_mutate.values(),
                      *(name for node in graph.nodes for name in _buffers_written(node))})
    if mutated:
        raise ModelCutError(
            f"{type(model).__name__}'s forward updates buffers in place ({', '.join(mutated[:3])}"
            f"{', ...' if len(mutated) > 3 else ''}), which a traced cut cannot replay exactly; trace it in eval "
            f"mode (model.eval()), or give it as an nn.Sequential (with deferred_batch_norm=True for batch norms)"
        )
    nodes = [n for n in graph.nodes if not (n.op == "call_module" and str(n.target).startswith("_guards"))]
    attrs = {n.target: _attribute(model, traced, n.target) for n in nodes if n.op == "get_attr"}
    owned = frozenset(t for t, v in attrs.items() if v is not _missing and _owned_by(model, t))
    attrs = {t: (v if t in owned else _constant(traced, t)) for t, v in attrs.items()}
    # stage of every computing node: execution order, advancing at the first node of each split point
    stage_of: dict[fx.Node, int] = {}
    current = 0
    for node in nodes:
        if node.op == "call_function":
            while current < len(split_points) and any(_inside(p, split_points[current]) for p in _module_paths(node)):
                current += 1
            stage_of[node] = current
        elif node.op == "call_module":
            raise ModelCutError(f"the traced graph of {type(model).__name__} calls a module ({node.target}); "
                                f"pipesched cuts flat graphs only")
    if current < len(split_points):
        raise ModelCutError(
            f"split_points[{current}] = {split_points[current]!r} runs no operation after the previous split "
            f"point in {type(model).__name__}'s forward; give split points in the order the forward runs "
            f"them, each naming a module that computes something"
        )
    free: dict[fx.Node, bool] = {}
    for node in nodes:
        if node.op != "output":
            free[node] = _replayable(node, owned, free)
    output = next(n for n in nodes if n.op == "output")
    count = len(split_points) + 1
    # what each stage receives: values made by an earlier stage and used later (recomputable ones are
    # rebuilt from the inputs instead, so the inputs they need travel in their place)
    consumers: dict[fx.Node, set[int]] = {}
    for node in nodes:
        stage = count - 1 if node.op == "output" else stage_of.get(node)
        if stage is None:
            continue
        for source in node.all_input_nodes:
            for needed in _sent(source, free, stage_of):
                consumers.setdefault(needed, set()).add(stage)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    live: list[list[fx.Node]] = [placeholders]
    for boundary in range(1, count):
        live.append([n for n in nodes if n in consumers and _made_before(n, boundary, stage_of)
                     and max(consumers[n]) >= boundary])
    for boundary, values in enumerate(live[1:], start=1):
        for value in values:
            example = value.meta.get("val")
            if not isinstance(example, Tensor):
                raise ModelCutError(
                    f"the cut before split_points[{boundary - 1}] = {split_points[boundary - 1]!r} would send "
                    f"a {type(example).__name__} ({value.name}) between stages; only tensors cross stages. "
                    f"Choose another split point"
                )
    out_spec = program.call_spec.out_spec
    keys = input_keys(program, kwargs)
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}
    stages = []
    for stage in range(count):
        inputs = live[stage]
        sends = None if stage == count - 1 else live[stage + 1]
        module = _stage_graph(nodes, stage, stage_of, free, attrs, owned, inputs, sends, output)
        stages.append(CutStage(module, keys if stage == 0 else None, constants,
                               out_spec if stage == count - 1 else None))
    return stages


def input_keys(program: torch.export.ExportedProgram, kwargs: Mapping[str, Any]) -> list[str]:
    """The keyword names in the order of the graph's placeholders (export's flattened inputs)."""
    in_spec = program.call_spec.in_spec
    paths, _ = pytree.tree_flatten_with_path(((), dict(kwargs)))
    keys = []
    for path, _ in paths:
        if len(path) != 2 or not isinstance(path[1], pytree.MappingKey):
            raise ModelCutError("pipesched cuts models whose inputs are keyword tensors; nested inputs are not supported")
        keys.append(path[1].key)
    _, spec = pytree.tree_flatten(((), dict(kwargs)))
    if spec != in_spec:
        raise ModelCutError("the traced inputs do not match the keyword inputs; pass a flat dict of tensors")
    return keys


def _sent(source: fx.Node, free: Mapping[fx.Node, bool], stage_of: Mapping[fx.Node, int]) -> list[fx.Node]:
    """What must reach a stage for it to have ``source``: itself, or (recomputed) the inputs it comes from."""
    if source.op == "get_attr":
        return []
    if not free.get(source, False):
        return [source]
    found, todo, seen = [], [source], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            found.append(node)
        todo.extend(node.all_input_nodes)
    return found


def _made_before(node: fx.Node, boundary: int, stage_of: Mapping[fx.Node, int]) -> bool:
    return node.op == "placeholder" or stage_of.get(node, boundary) < boundary


def _stage_graph(nodes: list[fx.Node], stage: int, stage_of: Mapping[fx.Node, int], free: Mapping[fx.Node, bool],
                 attrs: Mapping[str, Any], owned: frozenset[str], inputs: list[fx.Node], sends: list[fx.Node] | None,
                 output: fx.Node) -> fx.GraphModule:
    """One stage's graph: its inputs, the recomputed free values it uses, its own nodes, its outputs."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def value(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "get_attr":
                env[node] = graph.get_attr(node.target)  # type: ignore[arg-type]
            elif free.get(node) and node.op == "call_function":
                for source in node.all_input_nodes:
                    value(source)
                env[node] = graph.node_copy(node, value)
            else:
                raise ModelCutError(f"internal: stage {stage} needs {node.name}, which it does not receive")
        return env[node]

    for node in nodes:
        if node.op == "call_function" and stage_of[node] == stage:
            for source in node.all_input_nodes:
                value(source)
            env[node] = graph.node_copy(node, value)
    if sends is None:
        graph.output(tuple(value(n) if isinstance(n, fx.Node) else n for n in output.args[0]))
    else:
        graph.output(tuple(value(n) for n in sends))
    graph.eliminate_dead_code()
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    # the trace's own constants are copied per stage (no buffer shared across devices); the model's are its own
    return fx.GraphModule({t: attrs[t] if t in owned else attrs[t].clone() for t in used}, graph,
                          class_name=f"Stage{stage}")
