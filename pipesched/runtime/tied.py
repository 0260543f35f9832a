"""Tied weights across devices: one owner, a replica on each other device, gradients summed back.

A parameter used by stages on several devices (a language model's embedding
and output head, ``head.weight = emb.weight``) cannot be one tensor: a kernel
on ``cuda:1`` cannot read a tensor on ``cuda:0``. The single-process pipeline
therefore keeps:

* the **owner**: the user's ``Parameter`` itself, on the device of the first
  stage using it. ``model.parameters()``, the optimizer and the state dict
  only ever see it;
* a **replica** on each other device that uses it, made fresh from the
  owner's current value at the start of every step and every forward
  (``pipe(x)``). So whatever ``optimizer.step()`` did to the owner is what the
  next step computes with, on every device;
* while a step runs, the layers on that device hold the replica in place of
  the owner (their ``_parameters`` entry is swapped, and swapped back when the
  run ends, failed or not), so their forwards, recomputes and split weight
  gradients (W) all use and reach the replica;
* once the step's backward is done, each replica's gradient is added into the
  owner's ``.grad`` (on the owner's device): ``.grad`` is exactly what the
  un-pipelined model accumulates. A failed step drops the replicas'
  gradients along with everything else it accumulated.

Stages on one device share the owner directly (autograd serialises their
accumulations into the one ``.grad``), as before. Device *names* decide:
``devices=["cpu:0", "cpu:1"]`` are two devices to pipesched (as to torch),
so each keeps its own copy; that runs the replica path of a two-GPU setup
on a laptop. What cannot be replicated is refused by
:func:`~pipesched.runtime.partition.check_shared_parameters` before anything
runs: one *layer object* on two devices (it can hold one tensor per name),
and shared buffers (forwards mutate them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TiedParameter:
    """One parameter used on several devices: its owner, home, and the layer entries on each other device."""

    owner: nn.Parameter
    home: torch.device
    #: per other device, the ``(module, name)`` entries that hold the replica during a step
    slots: dict[torch.device, list[tuple[nn.Module, str]]] = field(default_factory=dict)


class TiedWeights:
    """The parameters of a single-process pipeline that need a replica on another device."""

    def __init__(self, ties: Sequence[TiedParameter]):
        self.ties = list(ties)

    @classmethod
    def find(cls, stages: Sequence[nn.Module | None], placement: Sequence[int],
             devices: Sequence[torch.device]) -> TiedWeights:
        """Every parameter whose stages live on more than one device (``stages[s]`` may be ``None``)."""
        uses: dict[int, tuple[nn.Parameter, list[tuple[torch.device, nn.Module, str]]]] = {}
        for index, stage in enumerate(stages):
            if stage is None:
                continue
            device = devices[placement[index]]
            for module in stage.modules():
                for name, param in module._parameters.items():
                    if param is not None:
                        uses.setdefault(id(param), (param, []))[1].append((device, module, name))
        ties = []
        for param, entries in uses.values():
            if len({device for device, _, _ in entries}) < 2:
                continue
            home = entries[0][0]  # the device of the first stage using it
            tie = TiedParameter(param, home)  # type: ignore[arg-type]
            seen: set[tuple[torch.device, int, str]] = set()
            for device, module, name in entries:
                if device != home and (device, id(module), name) not in seen:
                    seen.add((device, id(module), name))
                    tie.slots.setdefault(device, []).append((module, name))
            ties.append(tie)
        return cls(ties)

    def __bool__(self) -> bool:
        return bool(self.ties)

    @torch.no_grad()
    def place_owners(self) -> None:
        """Put each owner on its home device (moving the stages may have left it on another)."""
        for tie in self.ties:
            if tie.owner.device != tie.home:  # a CPU device name with an index is still 'cpu'
                if not (tie.owner.device.type == tie.home.type == "cpu"):
                    tie.owner.data = tie.owner.data.to(tie.home)
                    if tie.owner.grad is not None:
                        tie.owner.grad = tie.owner.grad.to(tie.home)

    def refresh(self) -> Replicas:
        """Fresh replicas of every owner's current value, for one step or forward.

        Fresh tensors, not an in-place copy: the graph of an earlier
        ``pipe(x)`` still waiting for its backward keeps the replicas it used.
        """
        made = []
        for tie in self.ties:
            value = tie.owner.detach()
            for device, slots in tie.slots.items():
                replica = nn.Parameter(value.to(device, copy=True), requires_grad=tie.owner.requires_grad)
                made.append((tie.owner, replica, slots))
        return Replicas(made)


class Replicas:
    """The replicas of one step or forward (and of its backward half, which reuses them)."""

    def __init__(self, made: list[tuple[nn.Parameter, nn.Parameter, list[tuple[nn.Module, str]]]]):
        self._made = made

    def pointers(self) -> frozenset[int]:
        """Data pointers of the replicas: parameters, not activations, for the memory meter."""
        return frozenset(replica.data_ptr() for _, replica, _ in self._made)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The layers on each replica's device hold it instead of the owner; the owner is back on exit."""
        for _, replica, slots in self._made:
            for module, name in slots:
                module._parameters[name] = replica
        try:
            yield
        finally:
            for owner, _, slots in self._made:
                for module, name in slots:
                    module._parameters[name] = owner

    @torch.no_grad()
    def reduce(self) -> None:
        """Add each replica's gradient into its owner's ``.grad`` (once), on the owner's device."""
        for owner, replica, _ in self._made:
            grad = replica.grad
            if grad is None:
                continue
            replica.grad = None
            grad = grad.to(owner.device)
            if owner.grad is None:
                owner.grad = grad  # the replica no longer holds it
            else:
                owner.grad.add_(grad)

    def discard(self) -> None:
        """A failed step: forget what the replicas accumulated."""
        for _, replica, _ in self._made:
            replica.grad = None


__all__ = ["Replicas", "TiedParameter", "TiedWeights"]
