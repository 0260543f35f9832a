"""torchgpipe's skip-connection API, its public behaviours (pipesched.skip), outside any pipeline.

Ported behaviours, written anew: stash/pop semantics in a plain call, the
errors for undeclared, unused and never-stashed names, namespaces, and
verify_skippables' messages.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import pipesched.skip
from pipesched.runtime.skip.tracker import (
    SkipTracker,
    current_skip_tracker,
    use_skip_tracker,
)
from pipesched.skip import Namespace, pop, skippable, stash, verify_skippables


@skippable(stash=["foo"])
class Stash(nn.Module):
    def forward(self, x):
        yield stash("foo", x)
        return x * 2


@skippable(pop=["foo"])
class Pop(nn.Module):
    def forward(self, x):
        foo = yield pop("foo")
        return x + foo


@pytest.fixture
def tracker():
    """A fresh tracker for the test's thread (so a test's leftovers cannot reach another)."""
    with use_skip_tracker(SkipTracker()) as fresh:
        yield fresh


def test_public_names_at_torchgpipe_paths():
    assert set(pipesched.skip.__all__) >= {"skippable", "stash", "pop", "Namespace", "verify_skippables"}


class TestStashPop:
    def test_stash_then_pop_in_one_sequential_call(self, tracker):
        model = nn.Sequential(Stash(), nn.Identity(), Pop())
        x = torch.tensor([1.0, 2.0])
        assert torch.equal(model(x), x * 2 + x)
        assert tracker.tensors == {}  # popped: the tracker forgets it

    def test_gradient_flows_through_the_skip(self, tracker):
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        nn.Sequential(Stash(), Pop())(x).sum().backward()
        assert torch.equal(x.grad, torch.full((2,), 3.0))  # d(2x + x)/dx

    def test_stash_alone_leaves_the_tensor_for_a_later_pop(self, tracker):
        Stash()(torch.tensor(42.0))
        assert list(tracker.tensors) == [(None, "foo")]
        assert Pop()(torch.tensor(1.0)).item() == 43.0
        assert tracker.tensors == {}

    def test_pop_before_stash_is_an_error(self, tracker):
        with pytest.raises(RuntimeError, match="'foo' has not been stashed"):
            nn.Sequential(Pop(), Stash())(torch.tensor(1.0))

    def test_declared_but_not_stashed_or_popped(self, tracker):
        @skippable(stash=["foo"])
        class Lazy(nn.Module):
            def forward(self, x):
                return x

        @skippable(pop=["foo"])
        class Ignores(nn.Module):
            def forward(self, x):
                return x

        with pytest.raises(RuntimeError, match="'foo' must be stashed but have not"):
            Lazy()(torch.tensor(1.0))
        Stash()(torch.tensor(1.0))
        with pytest.raises(RuntimeError, match="'foo' must be popped but have not"):
            Ignores()(torch.tensor(1.0))

    def test_unknown_names_are_errors(self, tracker):
        @skippable()
        class StashesUndeclared(nn.Module):
            def forward(self, x):
                yield stash("bar", x)
                return x

        @skippable(stash=["foo"])
        class PopsUndeclared(nn.Module):
            def forward(self, x):
                yield stash("foo", x)
                yield pop("bar")
                return x

        with pytest.raises(RuntimeError, match="'bar' has not been declared as stashable"):
            StashesUndeclared()(torch.tensor(1.0))
        with pytest.raises(RuntimeError, match="'bar' has not been declared as poppable"):
            PopsUndeclared()(torch.tensor(1.0))

    def test_yielding_something_else_is_a_type_error(self, tracker):
        @skippable()
        class Bad(nn.Module):
            def forward(self, x):
                yield x
                return x

        with pytest.raises(TypeError, match="not a command of @skippable"):
            Bad()(torch.tensor(1.0))

    def test_stash_none(self, tracker):
        @skippable(stash=["none"])
        class StashNone(nn.Module):
            def forward(self, x):
                yield stash("none", None)
                return x

        @skippable(pop=["none"])
        class PopNone(nn.Module):
            def forward(self, x):
                got = yield pop("none")
                assert got is None
                return x

        assert nn.Sequential(StashNone(), PopNone())(torch.tensor(1.0)).item() == 1.0

    def test_a_forward_without_yield_just_returns(self, tracker):
        @skippable()
        class Plain(nn.Module):
            def forward(self, x):
                return x + 1

        assert Plain()(torch.tensor(1.0)).item() == 2.0

    def test_each_thread_has_its_own_default_tracker(self):
        seen = []
        thread = threading.Thread(target=lambda: seen.append(current_skip_tracker()))
        thread.start()
        thread.join()
        assert type(seen[0]) is SkipTracker and seen[0] is not current_skip_tracker()


class TestSkippableClass:
    def test_repr_wraps_the_module(self):
        @skippable(stash=["hello"])
        class Hello(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 1, 1)

            def forward(self, x):
                yield stash("hello", x)
                return self.conv(x)

        assert repr(Hello()) == "@skippable(Hello(\n  (conv): Conv2d(1, 1, kernel_size=(1, 1), stride=(1, 1))\n))"
        assert Hello.__name__ == "Hello"
        assert [name for name, _ in Hello().named_parameters()] == ["module.conv.weight", "module.conv.bias"]

    def test_constructor_arguments_reach_the_wrapped_class(self):
        @skippable(stash=["s"])
        class Scaled(nn.Module):
            def __init__(self, factor, *, bias=0.0):
                super().__init__()
                self.factor, self.bias = factor, bias

            def forward(self, x):
                yield stash("s", x)
                return x

        layer = Scaled(3, bias=1.5)
        assert (layer.module.factor, layer.module.bias) == (3, 1.5)

    def test_names_must_be_lists(self):
        with pytest.raises(TypeError, match="lists of names"):
            skippable(stash="foo")


class TestNamespace:
    def test_namespaces_differ_and_copies_are_equal(self):
        ns = Namespace()
        assert Namespace() != ns
        assert copy.copy(ns) == ns and copy.copy(ns) is not ns
        assert copy.deepcopy(ns) == ns
        assert pickle.loads(pickle.dumps(ns)) == ns
        assert len({ns, copy.copy(ns), Namespace()}) == 2
        sorted([Namespace(), Namespace(), ns])  # ordered, so keys holding one can be sorted

    def test_isolated_reuse_of_one_class(self, tracker):
        ns1, ns2 = Namespace(), Namespace()
        model = nn.Sequential(Stash().isolate(ns1), Stash().isolate(ns2), Pop().isolate(ns2), Pop().isolate(ns1))
        verify_skippables(model)
        x = torch.tensor(1.0)
        # ns1 stashes x, ns2 stashes 2x; ns2's pop adds 2x to 4x, ns1's adds x: 7x
        assert model(x).item() == 7.0
        assert tracker.tensors == {}

    def test_isolate_only_some_names(self, tracker):
        @skippable(stash=["alice", "bob"])
        class Two(nn.Module):
            def forward(self, x):
                yield stash("alice", x)
                yield stash("bob", x * 10)
                return x

        @skippable(pop=["alice", "bob"])
        class PopTwo(nn.Module):
            def forward(self, x):
                a = yield pop("alice")
                b = yield pop("bob")
                return x + a + b

        ns_alice, ns_bob = Namespace(), Namespace()
        first = Two().isolate(ns_alice, only=["alice"]).isolate(ns_bob, only=["bob"])
        assert first.namespaced("alice") == (ns_alice, "alice") and first.namespaced("bob") == (ns_bob, "bob")
        second = PopTwo().isolate(ns_alice, only=["alice"])
        with pytest.raises(TypeError, match="'1' declared 'bob' as poppable but it was not stashed"):
            verify_skippables(nn.Sequential(first, second))  # bob is in ns_bob on one side only
        second.isolate(ns_bob, only=["bob"])
        verify_skippables(nn.Sequential(first, second))
        assert nn.Sequential(first, second)(torch.tensor(1.0)).item() == 12.0

    def test_isolate_takes_a_namespace(self):
        with pytest.raises(TypeError, match="takes a Namespace"):
            Stash().isolate("ns")


class TestVerifySkippables:
    def test_matching_pair(self):
        verify_skippables(nn.Sequential(Stash(), nn.Linear(1, 1), Pop()))

    def test_every_problem_is_listed(self):
        @skippable(stash=["foo"], pop=["foo"])
        class Both(nn.Module):
            pass

        @skippable(pop=["bar"])
        class PopBar(nn.Module):
            pass

        @skippable(stash=["baz"])
        class StashBaz(nn.Module):
            pass

        with pytest.raises(TypeError) as info:
            verify_skippables(nn.Sequential(Both(), PopBar(), StashBaz()))
        message = str(info.value)
        assert message.startswith("one or more pairs of stash and pop do not match")
        assert "'0' declared 'foo' both as stashable and as poppable" in message
        assert "'1' declared 'bar' as poppable but it was not stashed" in message
        assert "no module declared 'baz' as poppable but stashed" in message

    def test_stash_without_pop(self):
        with pytest.raises(TypeError, match="no module declared 'foo' as poppable but stashed"):
            verify_skippables(nn.Sequential(Stash()))

    def test_pop_without_stash(self):
        with pytest.raises(TypeError, match="'0' declared 'foo' as poppable but it was not stashed"):
            verify_skippables(nn.Sequential(Pop()))

    def test_pop_before_its_stash(self):
        with pytest.raises(TypeError, match="'0' declared 'foo' as poppable but it was not stashed"):
            verify_skippables(nn.Sequential(Pop(), Stash()))

    def test_duplicate_names_in_one_namespace(self):
        with pytest.raises(TypeError) as info:
            verify_skippables(nn.Sequential(Stash(), Pop(), Stash(), Pop()))
        assert "'2' redeclared 'foo' as stashable but not isolated by namespace" in str(info.value)
        assert "'3' redeclared 'foo' as poppable but not isolated by namespace" in str(info.value)

    def test_duplicates_isolated_by_namespaces_pass(self):
        ns1, ns2 = Namespace(), Namespace()
        verify_skippables(nn.Sequential(Stash().isolate(ns1), Pop().isolate(ns1), Stash().isolate(ns2),
                                        Pop().isolate(ns2)))

    def test_stash_and_pop_of_different_names_in_one_layer(self):
        @skippable(pop=["foo"], stash=["bar"])
        class Relay(nn.Module):
            pass

        @skippable(pop=["bar"])
        class PopBar(nn.Module):
            pass

        verify_skippables(nn.Sequential(Stash(), Relay(), PopBar()))
