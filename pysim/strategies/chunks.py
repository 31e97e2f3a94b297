"""How DeMo and SparseLoCo cut a tensor into chunks, each chunk keeping its own top-k.

A tensor of two or more dimensions is viewed as a matrix, ``shape[0]`` rows by the product of
the other dimensions, and cut into a x b tiles; a vector is cut into runs of c entries. Each of
a, b and c is the largest divisor of its dimension that is at most the target side (DeMo's
``chunk``, 64 in its paper; the same cutting in the SparseLoCo authors' code). So a 128 x 384
matrix is cut into 2 x 6 tiles of 64 x 64, a 10 x 784 one into one row of 14 tiles of 10 x 56,
and a bias of 10 entries is one chunk of 10.
"""

from __future__ import annotations

import math

import torch


def chunk_size(n: int, target: int) -> int:
    """The largest divisor of ``n`` that is <= ``target``."""
    return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def keep_topk_per_chunk(chunks: torch.Tensor, k: int) -> torch.Tensor:
    """``chunks`` (chunks x entries per chunk) with all but the ``k`` largest |values| of each
    chunk zeroed (all of them where a chunk has no more than ``k``)."""
    k = min(k, chunks.shape[1])
    idx = chunks.abs().topk(k, dim=1).indices
    return torch.zeros_like(chunks).scatter_(1, idx, chunks.gather(1, idx))


class Chunks:
    """The chunks of tensors of one ``shape`` at a ``target`` side (see the module docstring).
    ``sides``: (a, b) for a matrix, (c,) for a vector."""

    def __init__(self, shape: torch.Size | tuple[int, ...], target: int) -> None:
        self.shape = torch.Size(shape)
        self.dims = (self.shape[0], math.prod(self.shape[1:])) if len(self.shape) >= 2 else (math.prod(self.shape),)
        self.sides = tuple(chunk_size(n, target) for n in self.dims)

    @property
    def chunk_numel(self) -> int:
        """Entries per chunk."""
        return math.prod(self.sides)

    @property
    def count(self) -> int:
        """How many chunks a tensor of the shape has."""
        return self.shape.numel() // self.chunk_numel

    def kept(self, k: int) -> int:
        """How many entries :func:`keep_topk_per_chunk` keeps of a tensor of the shape."""
        return self.count * min(k, self.chunk_numel)

    def tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (R, C, a, b) tiles for a matrix (tile (i, j): rows i*a.., columns j*b..), or
        (chunks, c) for a vector (a copy where ``x``'s layout needs one)."""
        if len(self.dims) == 1:
            return x.reshape(-1, self.sides[0])
        (r, c), (a, b) = self.dims, self.sides
        return x.reshape(r // a, a, c // b, b).permute(0, 2, 1, 3)

    def untile(self, tiles: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`tiles`: a tensor of ``shape`` from its (R, C, a, b) tiles or its
        (chunks, c) runs (any view of them with those entries in that order)."""
        if len(self.dims) == 1:
            return tiles.reshape(self.shape)
        (r, c), (a, b) = self.dims, self.sides
        return tiles.reshape(r // a, c // b, a, b).permute(0, 2, 1, 3).reshape(self.shape)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (chunks, entries per chunk), a chunk's entries row by row within its tile."""
        return self.tiles(x).reshape(-1, self.chunk_numel)
