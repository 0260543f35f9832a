"""A rank's state dict under the model's own keys, so the ranks' parts together are the model's.

Built from a full ``nn.Sequential``, a :class:`~pipesched.distributed.DistributedPipeline`
knows which of the model's layers it owns (``_layer_stage``) and which belong
to other ranks (``_foreign_layers``): its state dict uses the keys of
``model.state_dict()``, and loading ignores other ranks' layers. Built from a
dict of stages it knows no model keys and keeps ``nn.Module``'s defaults.
Its own module because it is a concept of its own (checkpoints), not of the step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipesched.runtime.state_dict import route_to_layers, without_layers


class ModelKeyedState(nn.Module):
    """Mixin of :class:`~pipesched.distributed.DistributedPipeline`: ``_layer_stage`` (layer name ->
    stage, this rank's layers), ``_foreign_layers`` and ``local_stages`` come from the pipeline."""

    _layer_stage: dict[str, int]
    _foreign_layers: frozenset[str]
    local_stages: nn.ModuleDict
    _traced: Any  # a traced model's TracedModel (pipesched.distributed.traced), whose view holds its keys

    def _owned_layers(self) -> nn.Sequential:
        """This rank's layers under their names in the full model (a view; nothing is copied)."""
        layers = nn.Sequential()
        for name, stage in self._layer_stage.items():  # in model order
            layers.add_module(name, self.local_stages[str(stage)]._modules[name])
        return layers

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """This rank's part of the model's state dict, under the model's own keys.

        Built from a full ``nn.Sequential``: the entries of the layers this
        rank owns, keyed as in ``model.state_dict()``, so the parts of all
        ranks together are the model's state dict. Built from a dict of
        stages: the default ``local_stages.<stage>.…`` keys. A traced model: the
        entries of ``model.state_dict()`` whose tensors this rank's stages hold.
        """
        if self._traced is not None:
            return self._traced.view.module.state_dict(*args, destination=destination, prefix=prefix,
                                                       keep_vars=keep_vars)
        if not self._layer_stage:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return self._owned_layers().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load this rank's layers from the model's (full or partial) state dict.

        Entries of layers other ranks own are ignored; with ``strict``, every
        key of this rank's layers must be present and no key may name
        something the model does not have, as for ``model.load_state_dict``.
        """
        if self._traced is not None:
            if assign:
                raise ValueError("assign=True would put new tensors in place of the model's own, which this "
                                 "rank's traced stages hold: load with assign=False (copies into them)")
            view = self._traced.view
            return view.module.load_state_dict(view.without_foreign(state_dict), strict=strict, assign=assign)
        if not self._layer_stage:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return self._owned_layers().load_state_dict(
            without_layers(state_dict, self._foreign_layers), strict=strict, assign=assign
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Loading through a module that holds this pipeline: model keys to ``local_stages`` paths."""
        if self._layer_stage:
            routes = {name: f"local_stages.{stage}." for name, stage in self._layer_stage.items()}
            route_to_layers(state_dict, prefix, routes, drop=self._foreign_layers)
        super()._load_from_state_dict(state_dict, prefix, *args)


__all__ = ["ModelKeyedState"]
