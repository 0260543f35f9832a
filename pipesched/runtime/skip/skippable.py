"""Skip connections as torchgpipe spells them: ``@skippable``, ``stash``, ``pop``, ``verify_skippables``.

A skip connection hands a tensor from one layer of an ``nn.Sequential`` to a
later one, past the layers between (a U-Net's encoder-to-decoder links, a
residual around several layers). The layers declare the names they stash
and pop, and their ``forward`` is a generator::

    @skippable(stash=["1to3"])
    class Layer1(nn.Module):
        def forward(self, x):
            yield stash("1to3", x)
            return self.f(x)

    @skippable(pop=["1to3"])
    class Layer3(nn.Module):
        def forward(self, x):
            skip = yield pop("1to3")
            return self.g(x) + skip

    model = nn.Sequential(Layer1(), Layer2(), Layer3())   # runs as is, and in a Pipeline

The names are declared up front so a pipeline can tell, before anything
runs, which stage stashes and which pops each skip tensor, and send it
straight from one to the other. The same class used twice is isolated into
a :class:`~pipesched.runtime.skip.namespace.Namespace` per use.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from pipesched.runtime.skip.namespace import Namespace
from pipesched.runtime.skip.tracker import SkipKey, current_skip_tracker

__all__ = ["Skippable", "pop", "skippable", "stash", "verify_skippables"]

T = TypeVar("T", bound="Skippable")


class stash:
    """The command ``yield stash(name, tensor)``: hand ``tensor`` (or ``None``) to the layer that pops ``name``."""

    __slots__ = ("name", "tensor")

    def __init__(self, name: str, tensor: Tensor | None) -> None:
        self.name = name
        self.tensor = tensor


class pop:
    """The command ``tensor = yield pop(name)``: take the tensor an earlier layer stashed as ``name``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Skippable(nn.Module):
    """The base of classes made by :func:`skippable`; wraps an instance of the user's class as ``.module``.

    Do not subclass it directly: decorate with ``@skippable(stash=..., pop=...)``.
    """

    module_cls: ClassVar[type[nn.Module]]
    stashable_names: ClassVar[frozenset[str]]
    poppable_names: ClassVar[frozenset[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.module = self.module_cls(*args, **kwargs)
        self.namespaces: dict[str, Namespace] = {}

    def __repr__(self) -> str:
        return f"@skippable({self.module})"

    def namespaced(self, name: str) -> SkipKey:
        """``(namespace, name)``: the full name of the skip tensor ``name`` of this layer."""
        return (self.namespaces.get(name), name)

    def stashable(self) -> Iterable[SkipKey]:
        """The full names this layer stashes (sorted by name, so every process agrees on the order)."""
        return [self.namespaced(name) for name in sorted(self.stashable_names)]

    def poppable(self) -> Iterable[SkipKey]:
        """The full names this layer pops (sorted by name)."""
        return [self.namespaced(name) for name in sorted(self.poppable_names)]

    def isolate(self: T, ns: Namespace, *, only: Iterable[str] | None = None) -> T:  # noqa: PYI019 - Python 3.10
        """Put this layer's skip names (or just those in ``only``) into namespace ``ns``; returns ``self``.

        Two layers of one model may stash the same name only if isolated into
        different namespaces::

            ns1, ns2 = Namespace(), Namespace()
            nn.Sequential(Down().isolate(ns1), Down().isolate(ns2), Up().isolate(ns2), Up().isolate(ns1))
        """
        if not isinstance(ns, Namespace):
            raise TypeError(f"isolate() takes a Namespace, got {type(ns).__name__}; create one with Namespace()")
        names = self.stashable_names | self.poppable_names if only is None else set(only)
        for name in names:
            self.namespaces[name] = ns
        return self

    def dispatch(
        self,
        input: Any,
        handle_stash: Callable[[str, Tensor | None], None],
        handle_pop: Callable[[str], Tensor | None],
    ) -> Any:
        """Run the wrapped module's forward, serving each ``stash`` and ``pop`` it yields."""
        generator = self.module(input)
        if not isinstance(generator, Generator):  # a forward without any yield
            return generator
        try:
            command = next(generator)
            while True:
                if isinstance(command, stash):
                    handle_stash(command.name, command.tensor)
                    command = next(generator)
                elif isinstance(command, pop):
                    command = generator.send(handle_pop(command.name))
                else:
                    raise TypeError(f"{command!r} is not a command of @skippable: yield stash(...) or pop(...)")
        except StopIteration as stop:
            return stop.value

    def forward(self, input: Any) -> Any:  # type: ignore[override]
        """Run the layer: its pops are taken from the tracker first, its stashes saved there last.

        Raises ``RuntimeError`` when a declared name is not stashed (or not
        popped) by the forward, when the forward stashes or pops a name it did
        not declare, or when a name to pop was never stashed.
        """
        tracker = current_skip_tracker()
        poppable: dict[str, Tensor | None] = {}
        for key in self.poppable():
            try:
                poppable[key[1]] = tracker.load(key)
            except KeyError:
                raise RuntimeError(
                    f"'{key[1]}' has not been stashed: a layer before {type(self.module).__name__} must "
                    f"stash it in the same call (pipesched.skip.verify_skippables checks a model)"
                ) from None
        stashed: dict[str, Tensor | None] = {}

        def handle_stash(name: str, tensor: Tensor | None) -> None:
            if name not in self.stashable_names:
                raise RuntimeError(f"'{name}' has not been declared as stashable: add it to @skippable(stash=[...])")
            stashed[name] = tensor

        def handle_pop(name: str) -> Tensor | None:
            if name not in self.poppable_names:
                raise RuntimeError(f"'{name}' has not been declared as poppable: add it to @skippable(pop=[...])")
            if name not in poppable:
                raise RuntimeError(f"'{name}' was popped twice in one forward")
            return poppable.pop(name)

        output = self.dispatch(input, handle_stash, handle_pop)
        not_stashed = sorted(self.stashable_names - stashed.keys())
        if not_stashed:
            raise RuntimeError(f"{', '.join(map(repr, not_stashed))} must be stashed but have not")
        if poppable:
            raise RuntimeError(f"{', '.join(map(repr, sorted(poppable)))} must be popped but have not")
        for key in self.stashable():
            tracker.save(key, stashed[key[1]])
        return output


def skippable(
    stash: Iterable[str] = (), pop: Iterable[str] = ()
) -> Callable[[type[nn.Module]], type[Skippable]]:
    """Class decorator: a module whose ``forward`` yields ``stash(name, t)`` and ``pop(name)`` commands.

    ``stash`` and ``pop`` declare the names. The decorated class is a new
    :class:`Skippable` subclass of the same name; an instance wraps an
    instance of the original class (built with the same arguments) as
    ``.module``, so its parameters are named ``<layer>.module.<param>``, as in
    torchgpipe. It works in a plain ``nn.Sequential`` (stash and pop in the
    same call) and in a pipeline, where a skip tensor goes straight from the
    stashing stage to the popping one.
    """
    if isinstance(stash, str) or isinstance(pop, str):
        raise TypeError("stash and pop take lists of names, e.g. @skippable(stash=['skip']), not a single str")
    stashable_names, poppable_names = frozenset(stash), frozenset(pop)
    for name in stashable_names | poppable_names:
        if not isinstance(name, str):
            raise TypeError(f"skip names are str, got {name!r}")

    def extend(module_cls: type[nn.Module]) -> type[Skippable]:
        attrs = {
            "module_cls": module_cls,
            "stashable_names": stashable_names,
            "poppable_names": poppable_names,
            "__module__": module_cls.__module__,
            "__qualname__": module_cls.__qualname__,
            "__doc__": module_cls.__doc__,
        }
        return type(module_cls.__name__, (Skippable,), attrs)

    return extend


def verify_skippables(module: nn.Sequential) -> None:
    """Check that every skip name of ``module``'s layers has exactly one stash and, after it, one pop.

    Raises ``TypeError`` listing every problem: a name stashed and never
    popped, popped but not stashed before, stashed or popped again in the same
    namespace (isolate the layers into namespaces to reuse a name), or both
    stashed and popped by one layer.
    """
    stashed: set[SkipKey] = set()
    popped: set[SkipKey] = set()
    problems: list[str] = []
    for layer_name, layer in module.named_children():
        if not isinstance(layer, Skippable):
            continue
        for name in sorted(layer.stashable_names & layer.poppable_names):
            problems.append(f"'{layer_name}' declared '{name}' both as stashable and as poppable")
        for key in layer.stashable():
            if key[1] in layer.poppable_names:
                continue
            if key in stashed:
                problems.append(f"'{layer_name}' redeclared '{key[1]}' as stashable but not isolated by namespace")
                continue
            stashed.add(key)
        for key in layer.poppable():
            if key[1] in layer.stashable_names:
                continue
            if key in popped:
                problems.append(f"'{layer_name}' redeclared '{key[1]}' as poppable but not isolated by namespace")
                continue
            if key not in stashed:
                problems.append(f"'{layer_name}' declared '{key[1]}' as poppable but it was not stashed")
                continue
            popped.add(key)
    for key in sorted(stashed - popped, key=lambda k: k[1]):
        problems.append(f"no module declared '{key[1]}' as poppable but stashed")
    if problems:
        raise TypeError("one or more pairs of stash and pop do not match:\n\n" + "\n".join(f"* {p}" for p in problems))
