"""Stages that pass mappings (dicts, ModelOutput-like OrderedDicts) across boundaries and into loss_fn."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from conftest import assert_grads_equal
from torch import nn
from torch.nn import functional as F

from pipesched import Pipeline
from pipesched.runtime.structure import TENSOR, TUPLE, Structure, flatten, unflatten
from pipesched.distributed.wire import decode, encode


class Features(OrderedDict):
    """Like a Hugging Face ModelOutput: an OrderedDict subclass with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Pair(dict):
    """A mapping type that ``type(m)(d)`` cannot rebuild: it crosses as a plain dict."""

    def __init__(self, left, right):
        super().__init__(left=left, right=right)


class ToFeatures(nn.Module):
    def forward(self, x):
        return Features(hidden=x.tanh(), gate=x.sigmoid(), count=torch.full((x.shape[0],), 2))


class Mix(nn.Module):
    """Takes a mapping, returns a plain dict; records the type and keys it received."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 12)
        self.seen: list[tuple[type, list[str]]] = []

    def forward(self, features):
        self.seen.append((type(features), list(features)))
        mixed = self.linear(features["hidden"] * features["gate"]) * features["count"].unsqueeze(1)
        return {"mixed": mixed, "skip": features.hidden}


class Head(nn.Module):
    """The last stage's output: a ModelOutput-like mapping that loss_fn indexes."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 4)

    def forward(self, parts):
        return Features(logits=self.linear(parts["mixed"] + parts["skip"]), norm=parts["mixed"].norm(dim=1))


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), ToFeatures(), Mix(), nn.Identity(), Head()).double()


def logits_loss(out, y):
    return F.cross_entropy(out["logits"], y)


def data(rows=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


def reference(net, x, y):
    ref = copy.deepcopy(net)
    logits_loss(ref(x), y).backward()
    return [p.grad.clone() for p in ref.parameters()]


@pytest.mark.parametrize("schedule,balance", [("gpipe", [2, 1, 2]), ("1f1b", [2, 2, 1]),
                                              ("interleaved", [1, 1, 1, 2])])
@pytest.mark.parametrize("policy", ["always", "except_last", "never"])
def test_stages_passing_mappings_match_the_unpipelined_gradients(schedule, balance, policy):
    """A stage returning a dict or a ModelOutput-like mapping used to be refused at the boundary."""
    net = model()
    x, y = data()
    expected = reference(net, x, y)
    with Pipeline(net, schedule=schedule, balance=balance, chunks=3, checkpoint=policy,
                  loss_fn=logits_loss) as pipe:
        loss = pipe.step(x, y)
    torch.testing.assert_close(loss, logits_loss(net(x), y).detach(), rtol=0, atol=1e-12)
    assert_grads_equal(net, expected)
    # the next stage got a mapping of the type the stage returned, keys in order
    assert set(map(lambda s: (s[0], tuple(s[1])), net[2].seen)) == {(Features, ("hidden", "gate", "count"))}


def test_pipe_call_gathers_a_mapping_output_per_key():
    net = model()
    x, y = data()
    with Pipeline(net, balance=[2, 1, 2], chunks=3, loss_fn=logits_loss) as pipe:
        with torch.no_grad():
            out = pipe(x)
            want = net(x)
        assert type(out) is Features and list(out) == ["logits", "norm"]
        for key in want:
            torch.testing.assert_close(out[key], want[key], rtol=0, atol=1e-12)
        expected = reference(net, x, y)
        logits_loss(pipe(x), y).backward()  # the backward half through a mapping output
    assert_grads_equal(net, expected)


def test_mapping_that_cannot_be_rebuilt_arrives_as_a_dict():
    received = []

    class MakePair(nn.Module):
        def forward(self, x):
            return Pair(x, x * 2)

    class Sum(nn.Module):
        def forward(self, pair):
            received.append((type(pair), list(pair)))
            return pair["left"] + pair["right"]

    net = nn.Sequential(nn.Linear(4, 4), MakePair(), Sum()).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    with Pipeline(net, balance=[2, 1], chunks=2) as pipe, torch.no_grad():
        torch.testing.assert_close(pipe(x), net(x), rtol=0, atol=1e-12)
    assert received[0] == (dict, ["left", "right"])


@pytest.mark.parametrize("bad", [{1: torch.zeros(2)}, {}, {"a": torch.zeros(2), "b": [1]}])
def test_mapping_with_non_str_keys_or_non_tensors_is_a_type_error(bad):
    class Bad(nn.Module):
        def forward(self, x):
            return bad

    with Pipeline(nn.Sequential(nn.Linear(4, 4), Bad(), nn.Identity()), balance=[2, 1]) as pipe:
        with pytest.raises(TypeError, match="stage 0 returned .*mapping of str to Tensors"), torch.no_grad():
            pipe(torch.randn(2, 4))


def test_flatten_and_unflatten_round_trip():
    t = torch.zeros(2)
    assert flatten(t, "x") == ((t,), TENSOR)
    assert flatten((t, t), "x") == ((t, t), TUPLE)
    tensors, structure = flatten(Features(b=t, a=t + 1), "x")
    assert structure == Structure("mapping", ("b", "a"), Features)
    rebuilt = unflatten(tensors, structure)
    assert type(rebuilt) is Features and list(rebuilt) == ["b", "a"] and rebuilt["a"] is tensors[1]


def test_wire_header_carries_a_mapping_structure():
    values = (torch.zeros(3, 2), torch.ones(3, dtype=torch.long))
    for structure, kind in [(TENSOR, TENSOR), (TUPLE, TUPLE),
                            (Structure("mapping", ("x", "mask"), Features), Features),
                            (Structure("mapping", ("x", "mask"), type("Local", (dict,), {})), dict)]:
        header, description = encode(values, structure)
        parsed = decode(header)
        assert [s[1] if s else None for s in parsed.specs] == [(3, 2), (3,)]
        got = parsed.structure(description)
        assert got.kind == structure.kind and got.keys == structure.keys
        assert got.mapping_type is (kind if structure.kind == "mapping" else dict)


def test_wire_payload_packs_every_dtype_and_absent_gradients_into_one_buffer():
    """One buffer per message: tensors of any dtype (aligned views on the way out), absent ones skipped."""
    from pipesched.distributed.wire import ERROR, OK, pack, payload_bytes, spec_of, status_of, status_payload, unpack

    values = (torch.randn(3, 5), None, torch.tensor([True, False]), torch.randn(2, dtype=torch.complex128),
              torch.arange(3, dtype=torch.int16), torch.zeros(0, 4), torch.tensor(2.5, dtype=torch.float64),
              torch.randn(4, 6)[:, ::2].contiguous())
    spec = spec_of(values, TUPLE)
    buffer = pack(values, spec)
    assert buffer.dtype == torch.uint8 and buffer.numel() == payload_bytes(spec)
    assert status_of(buffer) == (OK, 0)
    received = unpack(buffer.clone(), spec)
    for got, sent in zip(received, values, strict=True):
        assert (got is None and sent is None) or (got.dtype == sent.dtype and torch.equal(got, sent))
    error = status_payload(spec, ERROR, 42)  # same size as the payload the receiver posted
    assert error.numel() == buffer.numel() and status_of(error) == (ERROR, 42)
