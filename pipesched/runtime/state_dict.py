"""A pipeline's state dict is its model's: the same keys, the same strictness.

A pipeline module holds the user's layers one level down (``Pipeline.module``,
``DistributedPipeline.local_stages[<stage>]``), so torch's default state dict
would prefix every key (``module.0.weight``) and a checkpoint saved from a
pipeline would not load into the plain model, nor the other way round. The
pipelines therefore save and load through the model's own layer names.

A module that *holds* a pipeline saves it through the pipeline's
``state_dict`` (torch calls each child's), so those keys are the model's too;
but torch loads children by walking their submodules, not by calling their
``load_state_dict``. :func:`route_to_layers` moves such keys to where the
layers really live before that walk.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any


def route_to_layers(state_dict: dict[str, Any], prefix: str, routes: Mapping[str, str],
                    drop: Collection[str] = ()) -> None:
    """Rename, in place, the entries under ``prefix`` from model keys to module paths.

    ``routes[layer]`` is the path (ending in ``.``) under which the model's
    layer ``layer`` lives inside the pipeline module; entries of layers in
    ``drop`` (owned by other ranks) are removed. Entries naming no layer are
    left alone, so a strict load reports them as unexpected.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        layer = rest.split(".", 1)[0]
        if layer in drop:
            del state_dict[key]
        elif layer in routes:
            state_dict[prefix + routes[layer] + rest] = state_dict.pop(key)


def without_layers(state_dict: Mapping[str, Any], drop: Collection[str]) -> OrderedDict[str, Any]:
    """``state_dict`` less the entries of layers in ``drop``, keeping its ``_metadata``."""
    kept: OrderedDict[str, Any] = OrderedDict(
        (key, value) for key, value in state_dict.items() if key.split(".", 1)[0] not in drop
    )
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        kept._metadata = metadata  # type: ignore[attr-defined]
    return kept
