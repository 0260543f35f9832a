"""Layers and parameters used more than once: a repeated layer object, a tied embedding and head.

The reference is the un-pipelined model in float64 (``copy.deepcopy`` keeps
the sharing), never anything the pipeline computed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_grads_equal, reference_grads
from pipesched import Pipeline
from pipesched.runtime.partition import check_shared_parameters, split_module

POLICIES = ["always", "except_last", "never", lambda stage, mb: (stage + mb) % 2 == 0]
SCHEDULES = [("gpipe", [3, 3]), ("1f1b", [3, 3]), ("interleaved-1f1b", [2, 1, 1, 2])]
X = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(1))


def repeated_model() -> nn.Sequential:
    """``lin`` and ``act`` each appear twice: positions 1, 3 and 2, 4."""
    torch.manual_seed(0)
    lin, act = nn.Linear(8, 8), nn.Tanh()
    return nn.Sequential(nn.Linear(8, 8), lin, act, lin, act, nn.Linear(8, 4)).double()


def test_split_module_keeps_a_repeated_layer_at_every_position():
    """named_children() listed a repeated layer once: every later layer moved up a stage."""
    model = repeated_model()
    stages = split_module(model, [4, 2])
    assert [list(stage._modules) for stage in stages] == [
        ["0", "1", "2", "3"], ["4", "5"]]
    assert [list(stage) for stage in stages] == [list(model)[:4], list(model)[4:]]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("schedule,balance", [("gpipe", [4, 2]), ("1f1b", [4, 2]),
                                              ("interleaved-1f1b", [1, 3, 1, 1])])
def test_repeated_layer_object_in_one_stage_gives_unpipelined_gradients(schedule, balance, policy):
    """Stage 0 (or 1) runs ``lin`` twice: its parameters are used twice within one stage."""
    model = repeated_model()
    loss_ref, ref = reference_grads(model, nn.CrossEntropyLoss(), X, Y)
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu", "cpu"], chunks=3,
                  checkpoint=policy, loss_fn=nn.CrossEntropyLoss()) as pipe:
        loss = pipe.step(X, Y)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref)


@pytest.mark.parametrize("schedule,balance", SCHEDULES)
def test_repeated_layer_object_across_stages_gives_unpipelined_gradients(schedule, balance):
    """``lin`` at positions 1 and 3 of ``[3, 3]`` lives in stages 0 and 1 (two CPU ranks)."""
    model = repeated_model()
    _, ref = reference_grads(model, nn.CrossEntropyLoss(), X, Y)
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu", "cpu"], chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(X, Y)
    assert_grads_equal(model, ref)


VOCAB, WIDTH = 11, 6


def tied_language_model() -> nn.Sequential:
    """Embedding → MLP → output head whose weight *is* the embedding's (weight tying)."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                         head).double()


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


TOKENS = torch.randint(0, VOCAB, (9, 5), generator=torch.Generator().manual_seed(2))
NEXT = torch.randint(0, VOCAB, (9, 5), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("schedule,balance", SCHEDULES)
def test_tied_embedding_and_head_on_two_ranks_give_unpipelined_gradients(schedule, balance, policy):
    """The embedding (stage 0, rank 0) and the head (last stage, rank 1) share one weight."""
    model = tied_language_model()
    assert model[0].weight is model[5].weight
    loss_ref, ref = reference_grads(model, token_loss, TOKENS, NEXT)
    before = [torch.full_like(p, 0.5) for p in model.parameters()]
    for param, grad in zip(model.parameters(), before):
        param.grad = grad.clone()
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu", "cpu"], chunks=4,
                  checkpoint=policy, loss_fn=token_loss) as pipe:
        loss = pipe.step(TOKENS, NEXT)
        assert pipe.stages[0][0].weight is pipe.stages[-1][-1].weight  # still one tensor
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    assert_grads_equal(model, [old + g for old, g in zip(before, ref)])  # old gradient added once


def test_tied_parameter_on_different_devices_or_processes_is_accepted():
    """It used to be refused; a replica per device (or a copy per process) now keeps it exact."""
    stages = split_module(tied_language_model(), [3, 3])
    check_shared_parameters(stages, [0, 1], [torch.device("cuda", 0), torch.device("cuda", 1)])
    check_shared_parameters(stages, [0, 1], [torch.device("cpu", 0), torch.device("cpu", 1)])
    check_shared_parameters(stages, [0, 1], None)


def test_repeated_layer_object_across_processes_is_accepted_but_not_across_devices():
    """Each process holds its own layer object (its copy's gradients are summed across processes);
    in one process one object cannot hold a replica and the original at once."""
    stages = split_module(repeated_model(), [2, 4])  # ``lin`` at 1 (stage 0) and 3 (stage 1)
    check_shared_parameters(stages, [0, 1], None)
    check_shared_parameters(stages, [0, 1], [torch.device("cpu")] * 2)
    with pytest.raises(ValueError, match=r"layer '1' = '3' \(one Linear object\) is used by stage 0 "
                                         r"\(rank 0, cuda:0\), stage 1 \(rank 1, cuda:1\)"):
        check_shared_parameters(stages, [0, 1], [torch.device("cuda", 0), torch.device("cuda", 1)])


def test_shared_buffer_on_different_devices_is_refused():
    torch.manual_seed(0)
    first, second = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    second.running_mean = first.running_mean
    stages = split_module(nn.Sequential(first, nn.Tanh(), second), [2, 1])
    with pytest.raises(ValueError, match="buffer '0.running_mean' = '2.running_mean' is shared by stage 0 "
                                         r"\(rank 0, cpu\), stage 1 \(rank 1, cuda:0\): forwards update"):
        check_shared_parameters(stages, [0, 1], [torch.device("cpu"), torch.device("cuda", 0)])
    with pytest.raises(ValueError, match=r"process of rank 1\): forwards update buffers in place"):
        check_shared_parameters(stages, [0, 1], None)
