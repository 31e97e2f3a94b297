"""2x2 max pooling for the built-in CNN: torch's result, bit for bit, at an eighth to a sixteenth of the cost.

torch's CPU kernel for ``max_pool2d`` on NCHW tensors is a scalar loop that
took about a third of a 3.3 ms MNIST-CNN training step on one thread (its
channels-last kernel is fast, but converting to and from that layout costs
more than it saves). :class:`MaxPool2x2` computes the same values and the same
argmax per window in C++ (:func:`pysim._C.maxpool2x2`, torch's rule: first
maximum in scan order, NaN wins), and its backward is torch's own
``max_pool2d_with_indices_backward`` on those indices, so forward values and
gradients (second derivatives too) are identical to ``nn.MaxPool2d(2)``'s.
Compute profiles count it as the one kernel torch's pooling is, with the same
bytes. Tensors the kernel does not take (not float32, not contiguous NCHW on the CPU, inside ``torch.func``
transforms) go to ``F.max_pool2d``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pysim import _C
from pysim.kernel_count import record_native_kernel


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        out = np.empty((n * c, h // 2, w // 2), dtype=np.float32)
        index = np.empty(out.shape, dtype=np.int64)
        _C.maxpool2x2(x.detach().numpy().reshape(n * c, h, w), out, index)
        record_native_kernel(x.numel() * 4 + out.nbytes + index.nbytes)   # as max_pool2d_with_indices
        ctx.save_for_backward(x, torch.from_numpy(index).view(n, c, h // 2, w // 2))
        return torch.from_numpy(out).view(n, c, h // 2, w // 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, index = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index)


def _kernel_takes(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and x.shape[2] >= 2 and x.shape[3] >= 2 and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not torch._C._are_functorch_transforms_active())


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, the same values and gradients (see the module docstring)."""
    return _MaxPool2x2.apply(x) if _kernel_takes(x) else F.max_pool2d(x, 2)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)``: the same values and gradients, through :func:`max_pool_2x2`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_2x2(x)
