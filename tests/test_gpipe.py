"""``pipesched.GPipe``: torchgpipe's public behaviour, on pipesched's ``Pipeline``.

Each test pins a behaviour torchgpipe users rely on (written from its
documented behaviour, not copied), or a place where pipesched deliberately
differs. Gradients are compared with the plain model in float64.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import pipesched
from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import GPipe, Pipeline, is_checkpointing, is_recomputing


def two_linears():
    torch.manual_seed(0)
    return nn.Linear(1, 1), nn.Linear(1, 1)


# ------------------------------------------------------------------ training as torchgpipe users do


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("chunks,rows", [(4, 12), (4, 7), (8, 3)])  # even, uneven, fewer rows than chunks
def test_output_then_loss_backward_gives_unpipelined_gradients(checkpoint, chunks, rows):
    model = mlp(layers=6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (rows,), generator=g)
    loss_ref, ref = reference_grads(model, nn.CrossEntropyLoss(), x.detach(), y)
    x_ref = x.detach().clone().requires_grad_()
    nn.CrossEntropyLoss()(copy.deepcopy(model)(x_ref), y).backward()
    gpipe = GPipe(model, balance=[2, 2, 2], devices=["cpu"] * 3, chunks=chunks, checkpoint=checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uneven or short batch is legal: no warning either
        output = gpipe(x)
    loss = nn.CrossEntropyLoss()(output, y)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_ref, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    gpipe.close()


def test_a_tuple_of_inputs_and_outputs_flows_and_gets_gradients():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_a, self.fc_b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, pair):
            a, b = pair
            return self.fc_a(a), self.fc_b(b)

    torch.manual_seed(0)
    model = nn.Sequential(Two(), Two()).double()
    a = torch.rand(10, 2, dtype=torch.float64, requires_grad=True)
    b = torch.rand(10, 2, dtype=torch.float64, requires_grad=True)
    reference = copy.deepcopy(model)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out_a, out_b = reference((a_ref, b_ref))
    (out_a * out_b).sum().backward()
    with GPipe(model, [1, 1], devices=["cpu", "cpu"], chunks=3) as gpipe:
        got_a, got_b = gpipe((a, b))
        (got_a * got_b).sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=0, atol=1e-12)
    assert_grads_equal(model, [p.grad for p in reference.parameters()])


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_deferred_batch_norm_statistics_and_gradients_equal_the_whole_batch(checkpoint):
    plain = nn.BatchNorm2d(3, dtype=torch.float64)
    norm = copy.deepcopy(plain)
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    with GPipe(nn.Sequential(norm), [1], devices=["cpu"], chunks=2, checkpoint=checkpoint,
               deferred_batch_norm=True) as gpipe:
        assert isinstance(gpipe[0], pipesched.DeferredBatchNorm) and gpipe[0].chunks == 2
        gpipe(x).pow(2).mean().backward()
    # per micro-batch normalisation in the pipeline, as in torchgpipe: the plain norm chunk by chunk
    plain_chunked = copy.deepcopy(plain)
    torch.cat([plain_chunked(part) for part in x.chunk(2)]).pow(2).mean().backward()
    plain(x)  # the statistics: the whole batch's, once
    torch.testing.assert_close(norm.running_mean, plain.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_var, plain.running_var, rtol=0, atol=1e-12)
    assert int(norm.num_batches_tracked) == 1
    torch.testing.assert_close(norm.weight.grad, plain_chunked.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.bias.grad, plain_chunked.bias.grad, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ checkpointing


def recorder(seen: list):
    class Record(nn.Module):
        def forward(self, x):
            seen.append((is_checkpointing(), is_recomputing()))
            return x * 2

    return Record()


@pytest.mark.parametrize("checkpoint,checkpointed", [("always", 2), ("except_last", 1), ("never", 0)])
def test_checkpoint_modes_checkpoint_that_many_microbatches_in_training(checkpoint, checkpointed):
    seen: list = []
    with GPipe(nn.Sequential(nn.Linear(1, 1), recorder(seen)), [1, 1], devices=["cpu", "cpu"], chunks=2,
               checkpoint=checkpoint) as gpipe:
        gpipe(torch.rand(2, 1)).sum().backward()
    assert sum(first for first, _ in seen) == checkpointed  # first, graph-less runs
    assert sum(again for _, again in seen) == checkpointed  # and as many recomputes in the backward
    for mode in ["always", "except_last", "never"]:  # chunks=1 takes every mode
        GPipe(nn.Sequential(nn.Linear(1, 1)), [1], devices=["cpu"], chunks=1, checkpoint=mode).close()


def test_eval_mode_checkpoints_nothing():
    """torchgpipe checkpoints in training only; a plain Pipeline follows its policy in both modes."""
    seen: list = []
    with GPipe(nn.Sequential(nn.Linear(1, 1), recorder(seen)), [1, 1], devices=["cpu", "cpu"], chunks=2,
               checkpoint="always") as gpipe:
        gpipe.eval()
        gpipe(torch.rand(2, 1)).sum().backward()
        assert seen == [(False, False)] * 2
        gpipe.train()
        seen.clear()
        gpipe(torch.rand(2, 1)).sum().backward()
        assert sorted(seen) == [(False, True)] * 2 + [(True, False)] * 2


def test_under_no_grad_nothing_keeps_a_graph():
    latent = []
    with GPipe(nn.Sequential(nn.Linear(1, 1)), [1], devices=["cpu"], chunks=2) as gpipe:
        gpipe.partitions[0].register_forward_hook(lambda module, inputs, output: latent.append(output))
        with torch.no_grad():
            gpipe(torch.rand(2, 1))
    assert len(latent) == 2 and all(out.grad_fn is None for out in latent)


def test_checking_and_recomputing_flags_are_exported_as_in_torchgpipe():
    from pipesched.runtime import checkpoint

    assert pipesched.is_checkpointing is checkpoint.is_checkpointing
    assert pipesched.is_recomputing is checkpoint.is_recomputing
    assert not is_checkpointing() and not is_recomputing()  # outside any pipeline


# ------------------------------------------------------------------ a sequence of its layers


@pytest.mark.parametrize("balance", [[2], [1, 1]])
def test_gpipe_is_a_sequence_of_its_layers(balance):
    a, b = two_linears()
    gpipe = GPipe(nn.Sequential(a, b), balance, devices=["cpu", "cpu"])
    assert len(gpipe) == 2
    assert list(gpipe) == [a, b]
    assert gpipe[0] is a and gpipe[1] is b
    assert gpipe[-1] is b and gpipe[-2] is a
    with pytest.raises(IndexError):
        gpipe[2]
    with pytest.raises(IndexError):
        gpipe[-3]
    gpipe.close()


def test_public_attributes():
    a, b = two_linears()
    gpipe = GPipe(nn.Sequential(a, b), (1, 1), devices=("cpu", "cpu"), chunks=42, checkpoint="always")
    assert gpipe.balance == [1, 1]
    assert gpipe.devices == [torch.device("cpu")] * 2
    assert gpipe.chunks == 42 and gpipe.checkpoint == "always"
    assert isinstance(gpipe.partitions, nn.ModuleList) and len(gpipe.partitions) == 2
    assert [list(p) for p in gpipe.partitions] == [[a], [b]]
    assert all(isinstance(p, nn.Sequential) for p in gpipe.partitions)
    assert list(gpipe.parameters()) == [a.weight, a.bias, b.weight, b.bias]
    names = {name for name, _ in gpipe.named_modules()}
    assert "module.0" in names and "module.1" in names
    with pytest.raises(AttributeError):
        gpipe.a  # no attribute lookup into the layers (GPipe has its own namespace)
    gpipe.close()


def test_named_layers_keep_their_names_in_partitions():
    a, b = two_linears()
    gpipe = GPipe(nn.Sequential(OrderedDict([("a", a), ("b", b)])), [1, 1], devices=["cpu", "cpu"])
    assert [dict(p.named_children()) for p in gpipe.partitions] == [{"a": a}, {"b": b}]
    assert list(gpipe.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]  # the model's keys
    gpipe.close()


def test_state_dict_saved_by_torchgpipe_loads():
    """torchgpipe saved ``partitions.<p>.<layer>.<param>``; both that and the model's keys load."""
    a, b = two_linears()
    gpipe = GPipe(nn.Sequential(a, b), [1, 1], devices=["cpu", "cpu"])
    saved = OrderedDict([("partitions.0.0.weight", torch.full((1, 1), 2.0)), ("partitions.0.0.bias", torch.ones(1)),
                         ("partitions.1.1.weight", torch.full((1, 1), 3.0)), ("partitions.1.1.bias", torch.zeros(1))])
    gpipe.load_state_dict(saved)
    assert a.weight.item() == 2.0 and b.weight.item() == 3.0
    holder = nn.Module()
    holder.pipe = gpipe
    holder.load_state_dict({f"pipe.{k}": v * 2 for k, v in saved.items()})
    assert a.weight.item() == 4.0 and b.weight.item() == 6.0
    gpipe.load_state_dict({"0.weight": torch.zeros(1, 1), "0.bias": torch.zeros(1),
                           "1.weight": torch.zeros(1, 1), "1.bias": torch.zeros(1)})
    assert a.weight.item() == 0.0
    gpipe.close()


def test_moving_is_refused_and_casting_allowed():
    gpipe = GPipe(nn.Sequential(*two_linears()), [1, 1], devices=["cpu", "cpu"])
    for move in [lambda: gpipe.cuda(), lambda: gpipe.cpu(), lambda: gpipe.to(torch.device("cuda")),
                 lambda: gpipe.to(0), lambda: gpipe.to("cuda"), lambda: gpipe.to(device=0),
                 lambda: gpipe.to(torch.rand(1)), lambda: gpipe.to(tensor=torch.rand(1))]:
        with pytest.raises(TypeError, match="places its stages on its devices itself"):
            move()
    gpipe.half()
    gpipe.to(torch.double)
    gpipe.to(dtype=torch.float)
    assert gpipe[0].weight.dtype == torch.float
    gpipe.close()


# ------------------------------------------------------------------ errors


def test_balance_is_required_and_checked_pointing_to_automatic_balance():
    a, b = two_linears()
    for balance in [None, [1], [3], [0, 2], [-1, 3]]:
        with pytest.raises(ValueError, match=r"pipesched\.balance\.balance_by_time"):
            GPipe(nn.Sequential(a, b), balance)


def test_bad_chunks_and_checkpoint_are_refused():
    model = nn.Sequential(nn.Linear(1, 1))
    for chunks in [0, -1, 42.0, "4"]:
        with pytest.raises((TypeError, ValueError), match="chunks"):
            GPipe(model, [1], devices=["cpu"], chunks=chunks)
    with pytest.raises(ValueError, match="checkpoint is not one of 'always', 'except_last', or 'never'"):
        GPipe(model, [1], devices=["cpu"], checkpoint="INVALID")


def test_devices_too_few_is_an_index_error_and_extra_devices_are_ignored():
    layers = [nn.Linear(1, 1) for _ in range(3)]
    with pytest.raises(IndexError, match=r"too few devices to hold 3 partitions: got 1"):
        GPipe(nn.Sequential(*layers), [1, 1, 1], devices=["cpu"])
    gpipe = GPipe(nn.Sequential(*layers), [1, 1, 1], devices=["cpu"] * 5)
    assert gpipe.devices == [torch.device("cpu")] * 3
    gpipe.close()
    with pytest.raises(TypeError, match="devices must be a list of devices"):
        GPipe(nn.Sequential(*layers), [1, 1, 1], devices="cpu")


def test_module_must_be_a_non_empty_sequential():
    with pytest.raises(TypeError, match="module must be an nn.Sequential to be partitioned, got Module"):
        GPipe(nn.Module(), [1])
    with pytest.raises(ValueError, match="empty nn.Sequential"):
        GPipe(nn.Sequential(), [])


def test_inputs_and_outputs_must_be_tensors():
    class Text(nn.Module):
        def forward(self, x):
            return (x, "hello")

    gpipe = GPipe(nn.Sequential(nn.Linear(1, 1)), [1], devices=["cpu"])
    with pytest.raises(TypeError, match="inputs must be a Tensor"):
        gpipe(42)
    with pytest.raises(TypeError, match="inputs"):
        gpipe((torch.rand(1, 1), "hello"))
    with pytest.raises(TypeError):
        gpipe(torch.rand(1, 1), torch.rand(1, 1))
    gpipe.close()
    with GPipe(nn.Sequential(Text()), [1], devices=["cpu"]) as text:
        with pytest.raises(TypeError, match=r"stage 0 returned tuple with \['Tensor', 'str'\]"):
            text(torch.rand(1, 1))


def test_an_exception_in_a_layer_reaches_the_caller_as_itself():
    class Expected(Exception):
        pass

    class Raise(nn.Module):
        def forward(self, x):
            raise Expected("from a layer")

    with GPipe(nn.Sequential(nn.Linear(1, 1), Raise()), [1, 1], devices=["cpu", "cpu"], chunks=2) as gpipe:
        with pytest.raises(Expected, match="from a layer"):
            gpipe(torch.rand(2, 1))


def test_repeated_layer_works_on_one_device_and_is_refused_across_devices_naming_it():
    """torchgpipe refused duplicate children everywhere; here they are exact where they can be."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    _, ref = reference_grads(model, lambda out, _: out.sum(), x, None)
    with GPipe(model, [2, 1], devices=["cpu", "cpu"], chunks=3) as gpipe:
        gpipe(x).sum().backward()
    assert_grads_equal(model, ref)
    with pytest.raises(ValueError, match=r"layer '0' = '2' \(one Linear object\) is used by stage 0 "
                                         r"\(rank 0, cpu:0\), stage 1 \(rank 1, cpu:1\).*twin = copy\.deepcopy"):
        GPipe(model, [2, 1], devices=["cpu:0", "cpu:1"])


def test_gpipe_is_a_pipeline_with_the_gpipe_schedule():
    with GPipe(nn.Sequential(*two_linears()), [1, 1], devices=["cpu", "cpu"]) as gpipe:
        assert isinstance(gpipe, Pipeline) and gpipe.schedule.name == "gpipe"
