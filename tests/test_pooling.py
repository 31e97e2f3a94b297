"""MaxPool2x2: nn.MaxPool2d(2)'s values, argmax and gradients bit for bit, counted as the same kernel."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pysim import _C
from pysim.compute import count_work
from pysim.pooling import MaxPool2x2, max_pool_2x2


def reference(x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    y.backward(grad)
    return y.detach(), idx, x.grad


def ours(x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    y = max_pool_2x2(x)
    y.backward(grad)
    return y.detach(), x.grad


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def hard_inputs():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(3, 4, 10, 12, generator=g)
    yield torch.randint(0, 3, (2, 3, 9, 7), generator=g).float()          # ties everywhere, odd sizes (floor)
    yield torch.relu(torch.randn(4, 2, 6, 6, generator=g))                # zeros tie
    x = torch.randn(2, 2, 8, 8, generator=g)
    x[0, 0, :2, :2] = float("nan")                                        # a window of NaNs: the last NaN
    x[0, 1, 2, 3] = float("nan")                                          # one NaN in a window
    x[1, 0, :2, :2] = -float("inf")                                       # a window of -inf: its first element
    x[1, 1, :2, :2] = torch.tensor([[0.0, -0.0], [-0.0, 0.0]])            # signed zeros
    x[1, 1, 4:6, 4:6] = torch.tensor([[-0.0, 0.0], [0.0, -0.0]])
    yield x
    yield torch.randn(1, 1, 2, 2, generator=g)
    yield torch.randn(1, 1, 3, 5, generator=g)


@pytest.mark.parametrize("x", list(hard_inputs()), ids=lambda x: "x".join(map(str, x.shape)))
def test_values_indices_and_gradients_are_torchs_bit_for_bit(x):
    grad = torch.randn(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2,
                       generator=torch.Generator().manual_seed(1))
    y_ref, idx_ref, gx_ref = reference(x, grad)
    y, gx = ours(x, grad)
    assert same_bits(y, y_ref) and same_bits(gx, gx_ref)
    n, c, h, w = x.shape
    out = np.empty((n * c, h // 2, w // 2), np.float32)
    idx = np.empty(out.shape, np.int64)
    _C.maxpool2x2(x.numpy().reshape(n * c, h, w), out, idx)
    assert np.array_equal(idx.reshape(idx_ref.shape), idx_ref.numpy())


def test_the_mnist_cnn_trains_the_same_as_with_nn_maxpool():
    from pysim.workload import Batches, get_workload

    wl = get_workload("mnist")
    data = Batches(wl.data()[0])
    torch.manual_seed(0)
    ours_model = wl.model()
    assert isinstance(ours_model.features[2], MaxPool2x2)
    torch_model = copy.deepcopy(ours_model)
    torch_model.features[2], torch_model.features[5] = nn.MaxPool2d(2), nn.MaxPool2d(2)
    opts = [wl.optimizer(m.parameters()) for m in (ours_model, torch_model)]
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        x, y = data.batch(torch.randint(len(data), (64,), generator=g))
        for m, o in zip((ours_model, torch_model), opts, strict=True):
            o.zero_grad()
            wl.loss(m(x), y).backward()
            o.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        assert same_bits(a.detach(), b.detach())
    x, y = data.batch(torch.arange(64))

    def step(m):
        return lambda: wl.loss(m(x), y).backward()

    assert count_work(step(ours_model)) == count_work(step(torch_model))   # the same kernels and bytes


def test_other_tensors_take_torchs_pooling():
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64),
              torch.randn(2, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last),
              torch.randn(3, 8, 8, generator=g)):
        assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))
    xs = torch.randn(4, 2, 3, 6, 6, generator=g)
    assert torch.equal(torch.func.vmap(max_pool_2x2)(xs), torch.stack([F.max_pool2d(v, 2) for v in xs]))


def test_the_kernel_checks_its_buffers():
    x = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="float32"):
        _C.maxpool2x2(x.astype(np.float64), np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.int64))
    with pytest.raises(ValueError, match="output must be"):
        _C.maxpool2x2(x, np.zeros((2, 2, 3), np.float32), np.zeros((2, 2, 2), np.int64))
    with pytest.raises(ValueError, match="index must be"):
        _C.maxpool2x2(x, np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.int32))
    with pytest.raises(ValueError, match="3-D"):
        _C.maxpool2x2(np.zeros((4, 4), np.float32), np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64))


def test_large_inputs_split_over_threads_give_the_same_bits():
    threads = _C.get_num_threads()
    try:
        _C.set_num_threads(2)
        x = torch.randn(8, 64, 66, 65, generator=torch.Generator().manual_seed(3))   # 2.2M values: two parts
        grad = torch.randn(8, 64, 33, 32, generator=torch.Generator().manual_seed(4))
        y_ref, _, gx_ref = reference(x, grad)
        y, gx = ours(x, grad)
        assert same_bits(y, y_ref) and same_bits(gx, gx_ref)
    finally:
        _C.set_num_threads(threads)


def test_second_derivatives_and_transforms_match_torch():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 3, 6, 6, generator=g)
    w = torch.randn(2, 3, 3, 3, generator=g)
    second = []
    for pool in (max_pool_2x2, lambda v: F.max_pool2d(v, 2)):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad((pool(x) * w).sum() ** 2, x, create_graph=True)
        second.append(torch.autograd.grad(gx.sum(), x)[0])
    assert same_bits(second[0], second[1])
    # inside torch.func transforms, on a tensor the transform does not wrap
    xs = torch.randn(3, 4, generator=g)
    out = torch.func.vmap(lambda v: v.sum() + max_pool_2x2(x0).sum())(xs)
    assert torch.equal(out, xs.sum(1) + F.max_pool2d(x0, 2).sum())
