"""``data_parallel_group=``: the arguments, and one process as its own replica group.

Replicas in several processes (2 and 4 gloo processes, both pipelines, unequal
token counts, a failing step) are tested in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline


def test_a_group_of_one_process_trains_as_without_it(one_process_group):
    model = mlp(layers=6)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(10, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (10,), generator=g)
    ref_loss, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with Pipeline(model, schedule="zb-h1", balance=[3, 3], devices=["cpu", "cpu"], chunks=4,
                  loss_fn=nn.CrossEntropyLoss(), data_parallel_group=dist.group.WORLD) as pipe:
        loss = pipe.step(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, expected)


def test_data_parallel_group_that_is_not_a_group_is_refused_naming_the_fix(one_process_group, no_thread_leak):
    with pytest.raises(TypeError, match=r"data_parallel_group must be a torch.distributed process group, got int; "
                                        r"e.g. torch.distributed.group.WORLD"):
        Pipeline(mlp(layers=6), balance=[3, 3], devices=["cpu", "cpu"], data_parallel_group=0)


def test_data_parallel_group_without_torch_distributed_is_refused_naming_the_fix(no_thread_leak):
    with pytest.raises(RuntimeError, match=r"data_parallel_group needs torch.distributed: call "
                                           r"torch.distributed.init_process_group\('gloo'\) first"):
        Pipeline(mlp(layers=6), balance=[3, 3], devices=["cpu", "cpu"], data_parallel_group=object())


def test_data_parallel_refuses_sparse_gradients(one_process_group, no_thread_leak):
    """Review 1.12: nn.Embedding(sparse=True) failed at the first step with torch's raw 'reshape is
    not implemented for sparse tensors'; now refused when the pipeline is built, naming the fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"parameter '0.weight' .*sparse gradients.*sparse=False"):
        Pipeline(model, balance=[2, 2], devices=["cpu", "cpu"], loss_fn=nn.CrossEntropyLoss(),
                 data_parallel_group=dist.group.WORLD)
