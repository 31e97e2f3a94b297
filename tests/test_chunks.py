"""How DeMo and SparseLoCo cut tensors into chunks: tiles of matrices, runs of vectors."""

import pytest
import torch

from pysim.strategies.chunks import Chunks, chunk_size, keep_topk_per_chunk


def test_a_side_is_the_largest_divisor_at_most_the_target():
    assert [chunk_size(n, 64) for n in (128, 384, 784, 10, 97, 65)] == [64, 64, 56, 10, 1, 13]


@pytest.mark.parametrize(("shape", "sides", "count"), [((128, 384), (64, 64), 12), ((10, 784), (10, 56), 14),
                                                       ((10,), (10,), 1), ((384,), (64,), 6),
                                                       ((32, 16, 5, 5), (32, 50), 8)])
def test_matrices_are_cut_into_tiles_and_vectors_into_runs(shape, sides, count):
    c = Chunks(shape, 64)
    assert c.sides == sides and c.count == count and c.chunk_numel * c.count == torch.Size(shape).numel()


def test_a_chunk_is_a_tile_of_rows_and_columns():
    x = torch.arange(4 * 6.0).reshape(4, 6)
    c = Chunks(x.shape, 3)      # 4 rows: tiles of 2 (the largest divisor of 4 up to 3); 6 columns: 3
    assert c.sides == (2, 3)
    assert c.split(x).tolist() == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11],
                                   [12, 13, 14, 18, 19, 20], [15, 16, 17, 21, 22, 23]]
    assert torch.equal(c.untile(c.tiles(x)), x) and torch.equal(c.untile(c.split(x)), x)
    conv = torch.randn(6, 2, 3, 3)   # viewed as 6 x 18
    assert torch.equal(Chunks(conv.shape, 4).untile(Chunks(conv.shape, 4).split(conv)), conv)


def test_top_k_is_kept_per_chunk():
    chunks = torch.tensor([[1.0, -5.0, 3.0, 0.5], [2.0, 0.0, -1.0, 4.0]])
    assert keep_topk_per_chunk(chunks, 2).tolist() == [[0, -5, 3, 0], [2, 0, 0, 4]]
    assert torch.equal(keep_topk_per_chunk(chunks, 9), chunks)      # a chunk of k or fewer is kept whole
    assert Chunks((4, 6), 3).kept(2) == 4 * 2 and Chunks((5,), 8).kept(9) == 5
