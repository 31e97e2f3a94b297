"""Contract of the codecs: selection, round trips, exact byte counts, errors."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysim import _C
from pysim.compress import (
    DenseCodec,
    ErrorFeedback,
    LowRankCodec,
    RandomKCodec,
    TopKCodec,
    get_codec,
    packet_header,
    unpack,
)

VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def tie_free(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(n, generator=g).float() + 1.0) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0
    )


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("n,k", [(10, 1), (10, 10), (1000, 7), (100_000, 1000), (2_000_000, 20_000)])
def test_topk_selects_same_set_as_torch(n, k):
    x = tie_free(n, seed=n)
    ours = torch.from_numpy(_C.topk_select(x.numpy(), k).astype(np.int64))
    ref = torch.topk(x.abs(), k).indices.sort().values
    assert torch.equal(ours, ref)


def test_topk_on_gaussian_large_uses_sampled_threshold_and_stays_exact():
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(3))
    for k in (1, 30, 30_000, 300_000):
        ours = _C.topk_select(x.numpy(), k)
        ref = torch.topk(x.abs(), k).indices.sort().values.numpy()
        assert np.array_equal(ours, ref)


@pytest.mark.parametrize("index_code", ["ef", "raw"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_topk_round_trip_exact_for_kept_zero_elsewhere(index_code, dtype):
    x = tie_free(5000, seed=1) / 100
    codec = TopKCodec(0.02, value_dtype=dtype, index_code=index_code)
    y = codec.unpack(codec.pack(x))
    keep = torch.topk(x.abs(), 100).indices
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[keep] = True
    wire = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert torch.equal(y[mask], x[mask].to(wire).float())
    assert torch.count_nonzero(y[~mask]) == 0


def test_topk_nan_raises():
    x = torch.randn(1000)
    x[17] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TopKCodec(10).pack(x)


def test_topk_bad_parameters():
    with pytest.raises(ValueError, match="exceeds"):
        TopKCodec(101).pack(torch.randn(100))
    for bad in (0, -3, 0.0, 1.5, "10", True):
        with pytest.raises(ValueError):
            TopKCodec(bad)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        _C.topk_select(np.zeros(10, np.float32), 11)


def test_elias_fano_within_115_percent_of_entropy_at_1_percent():
    n = 10_000_000
    k = n // 100
    p = k / n
    entropy_bits = (-p * math.log2(p) - (1 - p) * math.log2(1 - p)) / p
    bits = 8 * _C.elias_fano_bytes(n, k) / k
    assert bits <= 1.15 * entropy_bits, (bits, entropy_bits)
    x = torch.randn(n // 10)
    packet = TopKCodec(0.01).pack(x)
    assert len(packet) - packet_header(packet)["header_bytes"] - 4 * (n // 1000) == _C.elias_fano_bytes(
        n // 10, n // 1000
    )


# ---------------------------------------------------------------- random-k


def test_randomk_same_seed_same_indices_across_processes():
    code = (
        "import sys, torch; from pysim.compress import RandomKCodec;"
        "idx = RandomKCodec(0.01, seed=42).indices(100000, step=7, key='w');"
        "sys.stdout.write(str(int(idx.sum())) + ',' + str(int((idx * idx).sum() % 1000003)))"
    )
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    here = RandomKCodec(0.01, seed=42).indices(100000, step=7, key="w")
    assert outs[0] == outs[1] == f"{int(here.sum())},{int((here * here).sum() % 1000003)}"


def test_randomk_different_seeds_and_steps_differ():
    a = RandomKCodec(0.01, seed=1).indices(100000, step=0)
    assert not torch.equal(a, RandomKCodec(0.01, seed=2).indices(100000, step=0))
    assert not torch.equal(a, RandomKCodec(0.01, seed=1).indices(100000, step=1))
    assert torch.equal(a, RandomKCodec(0.01, seed=1).indices(100000, step=0))


def test_randomk_keeps_fraction_p_uniformly():
    n, p, trials = 2000, 0.05, 400
    codec = RandomKCodec(p, seed=9)
    counts = torch.zeros(n)
    for step in range(trials):
        idx = codec.indices(n, step)
        assert len(idx) == round(p * n)
        assert torch.all(idx[1:] > idx[:-1])
        counts[idx] += 1
    freq = counts / trials
    # each index kept with probability p: binomial sampling error per index
    sigma = math.sqrt(p * (1 - p) / trials)
    assert abs(float(freq.mean()) - p) < 1e-6
    assert float((freq - p).abs().max()) < 6 * sigma


def test_randomk_packet_has_no_index_bytes_and_round_trips():
    x = torch.randn(10_000)
    codec = RandomKCodec(0.01, seed=3)
    packet = codec.pack(x, step=5, key="a")
    assert len(packet) == 24 + 4 * 1 + 16 + 100 * 4
    y = unpack(packet)
    idx = codec.indices(10_000, step=5, key="a")
    assert torch.equal(y[idx], x[idx])
    assert torch.count_nonzero(y) == 100


def test_randomk_bad_parameters():
    for bad in (0, -0.1, 1.01, "0.1", None):
        with pytest.raises(ValueError, match="fraction"):
            RandomKCodec(bad)


# ---------------------------------------------------------------- low-rank


def torch_powersgd_reference(m: torch.Tensor, q: torch.Tensor):
    p = m @ q
    for c in range(p.shape[1]):
        for d in range(c):
            p[:, c] -= (p[:, c] @ p[:, d]) * p[:, d]
        p[:, c] /= p[:, c].norm()
    return p, m.T @ p


def test_lowrank_matches_torch_reference():
    m = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    codec = LowRankCodec(4, seed=1)
    q0 = codec.initial_q(80, "w").clone()
    packet = codec.pack(m, key="w")
    _, p, q = _C.unpack_factors(packet.numpy())
    p_ref, q_ref = torch_powersgd_reference(m.clone(), q0)
    torch.testing.assert_close(torch.from_numpy(p), p_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(q), q_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(codec.warm_start["w"], q_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(unpack(packet), p_ref @ q_ref.T, rtol=1e-4, atol=1e-3)


def test_lowrank_p_orthonormal_and_rank_r_input_exact():
    g = torch.Generator().manual_seed(5)
    m = torch.randn(200, 3, generator=g) @ torch.randn(3, 150, generator=g)
    codec = LowRankCodec(3)
    packet = codec.pack(m, key="x")
    _, p, _ = _C.unpack_factors(packet.numpy())
    p = torch.from_numpy(p)
    torch.testing.assert_close(p.T @ p, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(unpack(packet), m, atol=1e-3, rtol=1e-4)


def test_lowrank_kernels_match_torch():
    g = torch.Generator().manual_seed(2)
    for n, m, r in [(1, 1, 1), (37, 53, 3), (128, 300, 7), (513, 65, 8)]:
        M = torch.randn(n, m, generator=g)
        Q = torch.randn(m, r, generator=g)
        P = torch.from_numpy(_C.lowrank_mq(M.numpy(), Q.numpy()))
        torch.testing.assert_close(P, M @ Q, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(_C.lowrank_mtp(M.numpy(), P.numpy())), M.T @ P,
                                   rtol=1e-4, atol=1e-3)


def test_lowrank_falls_back_to_dense_for_vectors_and_small_matrices():
    codec = LowRankCodec(4)
    v = torch.randn(100)
    assert packet_header(codec.pack(v))["codec"] == "dense"
    assert torch.equal(unpack(codec.pack(v)), v)
    assert packet_header(codec.pack(torch.randn(4, 6)))["codec"] == "dense"
    conv = torch.randn(16, 8, 3, 3)
    packet = codec.pack(conv, key="conv")
    assert packet_header(packet)["codec"] == "lowrank"
    assert unpack(packet).shape == conv.shape


def test_lowrank_bad_parameters():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            LowRankCodec(bad)
    with pytest.raises(ValueError, match="Q must have shape"):
        _C.pack_lowrank(np.zeros(12, np.float32), [3, 4], 0, 3, np.zeros((3, 2), np.float32), 0)


# ---------------------------------------------------------------- formulas


def header(ndim: int, params: int) -> int:
    return 24 + 4 * ndim + params


def ef_bytes(n: int, k: int) -> int:
    low = int(math.floor(math.log2(n // k))) if n > k else 0
    return math.ceil(k * low / 8) + math.ceil((k + ((n - 1) >> low) + 1) / 8)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(7,), (31, 17), (4, 5, 3, 3)])
def test_byte_counts_equal_documented_formula(dtype, shape):
    b = VALUE_BYTES[dtype]
    n = math.prod(shape)
    x = torch.randn(shape)
    k = max(1, round(0.1 * n))
    rows, cols = shape[0], n // shape[0]
    expected = {
        DenseCodec(dtype): header(len(shape), 0) + n * b,
        TopKCodec(0.1, dtype, "raw"): header(len(shape), 8) + k * (b + 4),
        TopKCodec(0.1, dtype, "ef"): header(len(shape), 8) + k * b + ef_bytes(n, k),
        RandomKCodec(0.1, 0, dtype): header(len(shape), 16) + k * b,
    }
    lr = LowRankCodec(2, value_dtype=dtype)
    expected[lr] = (header(len(shape), 8) + (rows + cols) * 2 * b) if lr.compresses(shape) else \
        header(len(shape), 0) + 4 * n
    for codec, nbytes in expected.items():
        packet = codec.pack(x, key="t")
        assert len(packet) == nbytes == codec.nbytes(shape), codec


# ---------------------------------------------------------------- dtypes


def test_half_conversions_match_torch_bitwise():
    x = torch.cat([torch.randn(10_000) * 1e3, torch.randn(1000) * 1e-6,
                   torch.tensor([0.0, -0.0, 65504.0, 65520.0, 1e9, -1e9, float("inf"), 6e-8, 3e-8])])
    for dtype, tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        y = unpack(DenseCodec(dtype).pack(x))
        assert torch.equal(y, x.to(tdt).float()), dtype


def test_source_dtype_round_trips():
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(3, 4).to(dt)
        y = unpack(DenseCodec().pack(x))
        assert y.dtype == dt and torch.equal(y, x)


def test_wrong_dtype_and_device_rejected():
    for x in (torch.arange(10), torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.float64),
              np.zeros(3, np.float32)):
        with pytest.raises(ValueError):
            DenseCodec().pack(x)
    with pytest.raises(ValueError, match="float32"):
        _C.topk_select(np.zeros(10, np.float64), 3)


# ---------------------------------------------------------------- error feedback


def test_error_feedback_conserves_the_signal():
    codec = ErrorFeedback(TopKCodec(5))
    g = torch.Generator().manual_seed(4)
    total_in = torch.zeros(200)
    total_out = torch.zeros(200)
    for _ in range(20):
        x = torch.randn(200, generator=g)
        total_in += x
        total_out += codec.unpack(codec.pack(x, key="w"))
    torch.testing.assert_close(total_out + codec.residual["w"], total_in, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- specs


def test_codec_specs():
    assert isinstance(get_codec("dense:fp16"), DenseCodec)
    assert get_codec("topk:1000").k == 1000 and get_codec("topk:0.01").k == 0.01
    assert get_codec("topk:0.01:raw").index_code == 1
    assert get_codec("randomk:0.01:7").seed == 7
    assert get_codec("lowrank:4").rank == 4
    assert isinstance(get_codec("lowrank:2+ef"), ErrorFeedback)
    for bad in ("", "dense:fp8", "topk", "topk:abc", "lowrank:x", "zip:9", "randomk:2"):
        with pytest.raises(ValueError, match="codec spec"):
            get_codec(bad)


# ---------------------------------------------------------------- properties

CODECS = st.sampled_from(["dense", "dense:fp16", "dense:bf16", "topk:0.3", "topk:1", "topk:0.1:raw",
                          "randomk:0.5", "randomk:1.0", "lowrank:1", "lowrank:2:fp16"])
SHAPES = st.lists(st.integers(1, 9), min_size=0, max_size=4)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=CODECS, shape=SHAPES, dtype=DTYPES, seed=st.integers(0, 2**16))
def test_any_shape_dtype_round_trips(spec, shape, dtype, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    codec = get_codec(spec)
    packet = codec.pack(x, key="p")
    assert len(packet) == codec.nbytes(x.shape)
    y = codec.unpack(packet)
    assert y.shape == x.shape and y.dtype == x.dtype
    if spec == "dense" or spec == "randomk:1.0":
        assert torch.equal(y, x)


@settings(max_examples=120, deadline=None)
@given(spec=CODECS, cut=st.integers(0, 10_000), bit=st.integers(0, 10**9))
def test_every_truncation_or_bit_flip_raises(spec, cut, bit):
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(cut))
    packet = get_codec(spec).pack(x, key="p").numpy()
    truncated = packet[: cut % len(packet)]
    with pytest.raises(ValueError):
        unpack(truncated)
    flipped = packet.copy()
    pos = bit % (8 * len(packet))
    flipped[pos // 8] ^= np.uint8(1 << (pos % 8))
    with pytest.raises(ValueError):
        unpack(flipped)
    with pytest.raises(ValueError):
        unpack(np.concatenate([packet, np.zeros(1, np.uint8)]))


def test_foreign_packets_raise():
    for junk in (b"", b"hello world, this is not a packet at all", bytes(64)):
        with pytest.raises(ValueError):
            unpack(junk)
    with pytest.raises(ValueError, match="uint8"):
        unpack(torch.zeros(40, dtype=torch.int32))


def test_nan_passes_through_non_selecting_codecs():
    x = torch.randn(64)
    x[5] = float("nan")
    assert torch.isnan(unpack(DenseCodec().pack(x))[5])
    assert torch.isnan(unpack(DenseCodec("fp16").pack(x))[5])
    assert torch.isnan(unpack(DenseCodec("bf16").pack(x))[5])
    y = unpack(RandomKCodec(1.0).pack(x))
    assert torch.isnan(y[5]) and torch.equal(y[~torch.isnan(y)], x[~torch.isnan(x)])
