"""Optimizer state under the model's own names, for checkpoints that reload into another layout.

``torch.distributed.checkpoint`` (DCP) saves one dictionary per process
and stitches them together by key: a tensor saved under ``"model.2.weight"``
by the process that held stage 1 of a pp=2 x dp=2 run can be read back by
whichever process holds layer ``2`` in a pp=4 run, or by the plain model,
because every layout names it the same way. ``DistributedPipeline.state_dict()``
already uses the model's keys (:mod:`pipesched.distributed.model_keys`); under
FSDP2 its values are DTensor shards, which DCP saves once per shard and
reshards on load. This module gives the optimizer the same property, with
torch's own ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
(``torch.distributed.checkpoint.state_dict``), asked for the *flattened*
form: ``"state.<fqn>.exp_avg"``, ``"param_groups.<fqn>.lr"``. Flat keys
matter twice over: the unflattened form keeps ``param_groups`` as one list
per process, which two pipeline ranks would both save under the same key
(DCP keeps one of them), and a key per parameter is what lets a process of
another layout pick exactly its own parameters' entries.

::

    from torch.distributed import checkpoint as dcp
    from pipesched.distributed import optimizer_state_dict, load_optimizer_state_dict

    dcp.save({"model": pipe.state_dict(), "optim": optimizer_state_dict(pipe, opt)}, checkpoint_id=path)

    # any layout (another mesh, pp only, or the plain model, in one process or many)
    state = {"model": pipe.state_dict(), "optim": optimizer_state_dict(pipe, opt)}
    dcp.load(state, checkpoint_id=path)
    pipe.load_state_dict(state["model"])
    load_optimizer_state_dict(pipe, opt, state["optim"])

Both helpers also take a plain ``nn.Module``, so the un-pipelined model
reads the same checkpoint (``dcp.load`` without a process group, or after
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

#: the flat form: one key per parameter and per state entry, the same in every layout
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def model_view(module: nn.Module) -> nn.Module:
    """The module whose parameter names are the model's own: a pipeline's owned layers, or ``module`` itself.

    A :class:`~pipesched.distributed.DistributedPipeline` built from a dict of
    stages knows no model names; it is returned as it is (its checkpoints then
    reload only into pipelines built the same way)."""
    owned = getattr(module, "_owned_layers", None)
    if owned is not None and getattr(module, "_layer_stage", None):
        return owned()
    return module


def optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state keyed by the model's parameter names (flat), for ``torch.distributed.checkpoint``.

    ``module``: a :class:`~pipesched.distributed.DistributedPipeline` (its
    optimizer is over ``pipe.parameters()``) or a plain model. Under FSDP2
    the moment tensors are DTensor shards, as the parameters are. An
    optimizer that has not stepped yet gets its state created here (torch
    does that with a zero-gradient step that changes no parameter), so a
    fresh process has tensors for ``dcp.load`` to fill.
    """
    _check_optimizer(module, optimizer)
    return get_optimizer_state_dict(model_view(module), optimizer, options=FLAT)


def load_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`optimizer_state_dict` gave (filled by ``dcp.load``, from any layout) into ``optimizer``."""
    _check_optimizer(module, optimizer)
    set_optimizer_state_dict(model_view(module), optimizer, state, options=FLAT)


def _check_optimizer(module: nn.Module, optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    known = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in known:
                raise ValueError(f"optimizer holds a parameter of shape {tuple(param.shape)} that is not one of "
                                 f"{type(module).__name__}.parameters(): build it over pipe.parameters() (this "
                                 "process's stages), after the pipeline, whose FSDP2 replaces the parameters")


__all__ = ["load_optimizer_state_dict", "model_view", "optimizer_state_dict"]
