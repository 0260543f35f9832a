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

Replicas are per *rank*, not per device: two ranks sharing a device (say
``devices=["cpu", "cpu"]``) run on two threads, and were they to share the
owner, autograd would add their gradients into the one ``.grad`` in whatever
order the threads happen to reach it, so reruns of one step would differ in
the last bits. With a replica per rank each thread accumulates only into
its own tensor, and :meth:`Replicas.reduce` adds them into the owner in a
fixed order (ties, then ranks in stage order): bit-identical reruns. The
cost is one copy of the tied weight per extra rank, on its device. Stages
of one rank share the owner (one thread: a fixed order already). One layer
*object* repeated on ranks that share a device cannot hold two tensors under
one name, so those ranks share the owner as before (and such a layout's
reruns may differ in the last bits). Device *names* decide what is a device:
``devices=["cpu:0", "cpu:1"]`` are two devices to pipesched (as to torch),
which runs the replica path of a two-GPU setup on a laptop. What cannot be
replicated is refused by
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
    #: per other rank (or set of ranks sharing a layer object), its device and the
    #: ``(module, name)`` entries that hold its replica during a step
    slots: dict[int, tuple[torch.device, list[tuple[nn.Module, str]]]] = field(default_factory=dict)


class TiedWeights:
    """The parameters of a single-process pipeline that need a replica on another device."""

    def __init__(self, ties: Sequence[TiedParameter]):
        self.ties = list(ties)

    @classmethod
    def find(cls, stages: Sequence[nn.Module | None], placement: Sequence[int],
             devices: Sequence[torch.device]) -> TiedWeights:
        """Every parameter whose stages run on more than one rank (``stages[s]`` may be ``None``)."""
        uses: dict[int, tuple[nn.Parameter, list[tuple[int, nn.Module, str]]]] = {}
        for index, stage in enumerate(stages):
            if stage is None:
                continue
            rank = placement[index]
            for module in stage.modules():
                for name, param in module._parameters.items():
                    if param is not None:
                        uses.setdefault(id(param), (param, []))[1].append((rank, module, name))
        ties = []
        for param, entries in uses.values():
            keys = _replica_keys(entries, devices)
            if len(set(keys.values())) < 2:
                continue
            home_key = keys[entries[0][0]]  # the first stage using it holds the owner
            tie = TiedParameter(param, devices[entries[0][0]])  # type: ignore[arg-type]
            seen: set[tuple[int, int, str]] = set()
            for rank, module, name in entries:
                key = keys[rank]
                if key != home_key and (key, id(module), name) not in seen:
                    seen.add((key, id(module), name))
                    tie.slots.setdefault(key, (devices[rank], []))[1].append((module, name))
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
            for device, slots in tie.slots.values():  # in rank order: the order reduce() adds them
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
        """Add each replica's gradient into its owner's ``.grad`` (once), on the owner's device.

        Always in the order the replicas were made (ties, then ranks), on the
        caller's thread, whatever order the ranks finished in: the sum's bits
        do not depend on thread timing.
        """
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


def _replica_keys(entries: Sequence[tuple[int, nn.Module, str]], devices: Sequence[torch.device]
                  ) -> dict[int, int]:
    """Which copy each rank using a parameter computes with: its own (key = its rank), except that
    ranks on one device whose stages hold the same layer *object* share one (the lowest rank's):
    a layer holds one tensor per name, so it cannot hold a replica for one rank and not another."""
    keys = {rank: rank for rank, _, _ in entries}
    holders: dict[tuple[int, str], list[int]] = {}
    for rank, module, name in entries:
        holders.setdefault((id(module), name), []).append(rank)
    changed = True
    while changed:  # merge transitively: a chain of shared layer objects is one copy
        changed = False
        for ranks in holders.values():
            for rank in ranks:
                lowest = min(keys[r] for r in ranks if devices[r] == devices[rank])
                if keys[rank] != lowest:
                    keys[rank], changed = lowest, True
    return keys


__all__ = ["Replicas", "TiedParameter", "TiedWeights"]
