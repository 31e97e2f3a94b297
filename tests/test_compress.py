"""Contract of the codecs: selection, round trips, exact byte counts, errors."""

import math
import struct
import subprocess
import sys

import node_programs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysim import _C
from pysim.compress import (
    DEFAULT_MAX_NUMEL,
    DenseCodec,
    ErrorFeedback,
    LowRankCodec,
    QuantCodec,
    RandomKCodec,
    TopKCodec,
    get_codec,
    packet_header,
    split_packets,
    unpack,
)
from pysim.launch import run_nodes
from pysim.network import Network

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


def test_topk_sends_nan_as_the_largest_magnitude():
    # a diverging run sends what a real one would; the node notices its loss (pysim.node)
    x = torch.randn(1000)
    x[17], x[400] = float("nan"), float("inf")
    y = unpack(TopKCodec(10).pack(x))
    assert torch.isnan(y[17]) and y[400] == float("inf")
    rest = x.clone()
    rest[[17, 400]] = 0
    top8 = rest.abs().topk(8).indices
    assert torch.equal(y[top8], x[top8]) and torch.count_nonzero(y) == 10


def test_a_topk_count_beyond_a_tensor_keeps_it_whole():
    # a codec's count applies per tensor: DiLoCo(codec='topk:12') meets a model's 10-value bias
    x = torch.randn(100)
    packet = TopKCodec(101).pack(x)
    assert torch.equal(packet, TopKCodec(100).pack(x)) and TopKCodec(101).nbytes((100,)) == len(packet)
    assert torch.equal(TopKCodec(101).unpack(packet), x)


def test_topk_bad_parameters():
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

SPECS = ["dense", "dense:fp16", "dense:bf16", "topk:0.3", "topk:1", "topk:0.1:raw", "randomk:0.5", "randomk:1.0",
         "lowrank:1", "lowrank:2:fp16", "int8", "int8:4:stochastic", "int4:2", "int4:32:stochastic"]
CODECS = st.sampled_from(SPECS)
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


# ---------------------------------------------------------------- crafted packets
#
# The wire layout, restated here to craft packets (csrc/wire.hpp): a 24-byte base
# header <magic, version, codec, value dtype, source dtype, ndim, flags, 2 reserved,
# CRC-32C, payload length>, the shape as uint32, the codec parameters, the payload.

BASE = struct.Struct("<4sBBBBBBHIQ")
PARAMS = {0: "", 1: "<Q", 2: "<QQ", 3: "<II", 4: "<QI", 5: "<QI"}  # by codec id


def reseal(packet_bytes) -> bytes:
    """The packet with its CRC-32C recomputed, so that header edits pass the checksum."""
    b = bytearray(bytes(packet_bytes))
    b[12:16] = bytes(4)
    b[12:16] = struct.pack("<I", _C.crc32c(bytes(b)))
    return bytes(b)


def craft(codec: int, shape, params=(), payload: bytes = b"", *, value_dtype: int = 0, source_dtype: int = 0,
          flags: int = 0, payload_len: int | None = None, version: int = 2) -> bytes:
    """A sealed packet with exactly these header fields."""
    head = BASE.pack(b"PSIM", version, codec, value_dtype, source_dtype, len(shape), flags, 0, 0,
                     len(payload) if payload_len is None else payload_len)
    head += struct.pack(f"<{len(shape)}I", *shape)
    if codec in PARAMS and PARAMS[codec]:
        head += struct.pack(PARAMS[codec], *params)
    return reseal(head + payload)


def test_craft_restates_the_wire_format():
    x = torch.randn(3, 5)
    for spec, codec, params in (("dense", 0, ()), ("topk:4:raw", 1, (4,)), ("randomk:0.4", 2, None),
                                ("lowrank:1", 3, (3, 1)), ("int8:4", 4, (0, 4))):
        packet = bytes(get_codec(spec).pack(x, key="k", step=1).numpy())
        h = packet_header(packet)
        params = (h["seed"], h["k"]) if params is None else params
        payload = packet[h["header_bytes"]:]
        assert craft(codec, [3, 5], params, payload, value_dtype=h["value_dtype"], flags=h["flags"]) == packet


def test_sparse_packet_of_a_huge_tensor_is_refused_before_decoding():
    # 45 bytes: top-k, k = 1 of 2^30 elements (4 value bytes, 5 Elias-Fano bytes)
    value, index = struct.pack("<f", 1.0), bytes([0, 0, 0, 0, 0b101])
    packet = craft(1, [2**30], (1,), value + index)
    assert packet_header(packet)["numel"] == 2**30
    with pytest.raises(ValueError, match="expected"):
        unpack(packet, expect_shape=(1000,))
    with pytest.raises(ValueError, match="max_numel"):
        unpack(packet, max_numel=10**6)
    # 48 bytes: random-k, k = 1 of 2^26 elements
    packet = craft(2, [2**26], (7, 1), value)
    assert len(packet) == 48
    with pytest.raises(ValueError, match="max_numel"):
        unpack(packet, max_numel=10**6)
    # over the default budget of 2^26 elements (256 MiB of float32), without a shape: 48 bytes asking for 4 GiB
    assert DEFAULT_MAX_NUMEL == 2**26
    with pytest.raises(ValueError, match="max_numel=67108864"):
        unpack(craft(2, [2**30], (7, 1), value))
    with pytest.raises(ValueError, match="max_numel=67108864"):
        unpack(craft(2, [2**26 + 1], (7, 1), value))


def test_size_claims_past_2_to_32_are_value_errors():
    value = struct.pack("<f", 1.0)
    for packet in (craft(1, [2**32 - 1, 2], (1,), value + bytes(4), flags=1),  # top-k raw, 2^33 elements
                   craft(2, [2**20, 2**20], (7, 1), value),  # random-k, 2^40 elements
                   craft(0, [2**20, 2**20, 2], (), value),  # dense, 2^41 elements
                   craft(4, [2**33 // 64, 64], (0, 64), bytes(8))):
        with pytest.raises(ValueError):
            unpack(packet, max_numel=2**64 - 1)


def test_lowrank_size_formula_cannot_wrap_around():
    # rows=1, cols=2^31-1, rank=2^31: (rows + cols) * rank * 4 bytes = 2^64, which wraps to an empty payload
    packet = craft(3, [1, 2**31 - 1], (1, 2**31))
    assert len(packet) == 40
    with pytest.raises(ValueError):
        unpack(packet, max_numel=2**64 - 1)
    with pytest.raises(ValueError, match="rank"):
        unpack(craft(3, [4, 3], (4, 4), bytes(4 * 4 * 7)))  # rank 4 > min(rows, cols) = 3
    with pytest.raises(ValueError, match="rank must be in"):
        _C.pack_lowrank(np.zeros(12, np.float32), [4, 3], 0, 4, np.zeros((3, 4), np.float32), 0)


def test_expect_shape_and_max_numel_accept_the_right_packet():
    x = torch.randn(4, 6)
    packet = DenseCodec().pack(x)
    assert torch.equal(unpack(packet, expect_shape=(4, 6)), x)
    assert torch.equal(unpack(packet, max_numel=24), x)
    assert torch.equal(DenseCodec().unpack(packet, expect_shape=torch.Size([4, 6])), x)
    with pytest.raises(ValueError, match=r"shape \(4, 6\), expected \(6, 4\)"):
        unpack(packet, expect_shape=(6, 4))
    with pytest.raises(ValueError, match="max_numel"):
        unpack(packet, max_numel=23)
    for bad in ({"expect_shape": (-1,)}, {"expect_shape": (2**32,)}, {"max_numel": -1}, {"max_numel": 1.5}):
        with pytest.raises(ValueError):
            unpack(packet, **bad)


def test_non_contiguous_buffers_are_value_errors():
    packet = bytes(DenseCodec().pack(torch.randn(8)).numpy())
    doubled = memoryview(bytes(b for c in packet for b in (c, 0)))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        unpack(doubled)
    with pytest.raises(ValueError, match="contiguous"):
        _C.unpack(doubled)
    assert torch.equal(unpack(memoryview(packet)), unpack(packet))


def test_split_packets_reads_lengths_from_headers():
    x = torch.randn(5, 4)
    packets = [get_codec(s).pack(x, key="a") for s in ("dense", "topk:3", "int8", "int4:4:stochastic")]
    parts = split_packets(torch.cat(packets))
    assert [len(p) for p in parts] == [len(p) for p in packets]
    with pytest.raises(ValueError, match="truncated"):
        split_packets(torch.cat(packets)[:-1])
    with pytest.raises(ValueError, match="bundle corrupted"):
        split_packets(torch.cat([packets[0], torch.zeros(30, dtype=torch.uint8)]))


BOUNDARY = [0, 1, 2, 3, 7, 8, 63, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**62,
            2**63 - 1, 2**63, 2**64 - 1]
U64 = st.one_of(st.sampled_from(BOUNDARY), st.integers(0, 2**64 - 1), st.integers(0, 300))
U32 = st.one_of(st.sampled_from([b for b in BOUNDARY if b < 2**32]), st.integers(0, 2**32 - 1), st.integers(0, 300))
FUZZ_MAX_NUMEL = 10**6


def decode_or_value_error(packet: bytes) -> None:
    """Every decode path either succeeds within the caller's bound or raises ValueError."""
    for call in (lambda: unpack(packet, max_numel=FUZZ_MAX_NUMEL), lambda: packet_header(packet),
                 lambda: _C.unpack_factors(packet, FUZZ_MAX_NUMEL), lambda: split_packets(packet)):
        try:
            out = call()
        except ValueError:
            continue
        if isinstance(out, torch.Tensor):
            assert out.numel() <= FUZZ_MAX_NUMEL


@settings(max_examples=400, deadline=None)
@given(codec=st.integers(0, 7), value_dtype=st.integers(0, 3), source_dtype=st.integers(0, 3),
       flags=st.integers(0, 3), shape=st.lists(U32, max_size=9), params=st.tuples(U64, U64),
       payload=st.binary(max_size=200), payload_len=st.one_of(st.none(), U64), version=st.sampled_from([2, 2, 1, 3]))
def test_crafted_headers_raise_only_value_error(codec, value_dtype, source_dtype, flags, shape, params, payload,
                                                payload_len, version):
    fmt = PARAMS.get(codec, "")
    fields = [params[i] & (0xFFFFFFFF if fmt[1 + i] == "I" else 2**64 - 1) for i in range(len(fmt) - 1)]
    head = BASE.pack(b"PSIM", version, codec, value_dtype, source_dtype, len(shape) if len(shape) <= 8 else 9, flags,
                     0, 0, len(payload) if payload_len is None else payload_len)
    head += struct.pack(f"<{len(shape)}I", *shape) + (struct.pack(fmt, *fields) if fmt else b"")
    decode_or_value_error(reseal(head + payload))


HEADER_FIELDS = st.sampled_from(["version", "codec", "value_dtype", "source_dtype", "ndim", "flags", "reserved",
                                 "payload_len", "dim", "param", "payload_byte", "cut", "extend"])


@settings(max_examples=400, deadline=None)
@given(spec=CODECS, shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), field=HEADER_FIELDS,
       value=U64, where=st.integers(0, 2**16))
def test_every_resealed_header_edit_raises_only_value_error(spec, shape, field, value, where):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(where))
    b = bytearray(get_codec(spec).pack(x, key="e", step=where).numpy().tobytes())
    ndim, hb = b[8], packet_header(bytes(b))["header_bytes"]
    single = {"version": 4, "codec": 5, "value_dtype": 6, "source_dtype": 7, "ndim": 8, "flags": 9, "reserved": 10}
    if field in single:
        b[single[field]] = value & 0xFF
    elif field == "payload_len":
        b[16:24] = struct.pack("<Q", value)
    elif field == "dim":
        o = 24 + 4 * (where % ndim)
        b[o:o + 4] = struct.pack("<I", value & 0xFFFFFFFF)
    elif field == "param" and hb > 24 + 4 * ndim:
        o = 24 + 4 * ndim + 4 * (where % ((hb - 24 - 4 * ndim) // 4))
        b[o:o + 4] = struct.pack("<I", value & 0xFFFFFFFF)
    elif field == "payload_byte" and len(b) > hb:
        b[hb + where % (len(b) - hb)] = value & 0xFF
    elif field == "cut":
        del b[hb + (where % (len(b) - hb + 1)) - 1:]
    elif field == "extend":
        b += bytes(1 + value % 64)
    decode_or_value_error(reseal(b))


# ---------------------------------------------------------------- quantised codecs


def bf16_round_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= s (s >= 0, float32), by bit manipulation."""
    bits = s.contiguous().view(torch.int32)
    up = (bits >> 16) + ((bits & 0xFFFF) != 0).int()
    return (up << 16).view(torch.float32)


def block_scales(x: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """Per-element scale absmax(block)/qmax rounded up to bf16: the reference for the error bound."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    s = bf16_round_up(blocks.abs().amax(dim=1) / qmax)
    return s.repeat_interleave(block)[: flat.numel()]


@pytest.mark.parametrize("bits,block", [(8, 64), (8, 2), (8, 1000), (4, 32), (4, 2), (4, 130)])
def test_quant_nearest_error_at_most_half_a_scale_step(bits, block):
    x = torch.randn(10_007, generator=torch.Generator().manual_seed(bits * block)) * torch.linspace(0.01, 100, 10_007)
    y = unpack(QuantCodec(bits, block).pack(x))
    s = block_scales(x, block, 127 if bits == 8 else 7)
    err = (y - x).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-6) + 1e-30)
    assert float((err / s).max()) > 0.45  # the bound is tight: errors do reach half a step
    assert torch.all(s <= x.abs().reshape(-1).max() / (127 if bits == 8 else 7) * (1 + 2**-7))


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_stochastic_rounding_is_unbiased(bits):
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    codec = QuantCodec(bits, 64, "stochastic", seed=3)
    steps = 400
    total = torch.zeros_like(x)
    s = block_scales(x, 64, 127 if bits == 8 else 7)
    for step in range(steps):
        y = codec.unpack(codec.pack(x, key="w", step=step))
        assert torch.all((y - x).abs() < s * (1 + 1e-6))
        total += y
    mean_err = total / steps - x
    # each draw errs by at most one step s, with variance <= s^2 / 4 around its mean
    sigma = s / (2 * math.sqrt(steps))
    assert torch.all(mean_err.abs() <= 5 * sigma)
    assert abs(float((mean_err / sigma).mean())) < 5 / math.sqrt(x.numel())


def test_quant_stochastic_packing_is_reproducible_and_seeded():
    x = torch.randn(500)
    a = QuantCodec(8, 64, "stochastic", seed=1)
    assert torch.equal(a.pack(x, key="w", step=2), QuantCodec(8, 64, "stochastic", seed=1).pack(x, key="w", step=2))
    assert not torch.equal(a.pack(x, key="w", step=2), a.pack(x, key="w", step=3))
    assert not torch.equal(a.pack(x, key="w", step=2), a.pack(x, key="v", step=2))
    assert packet_header(a.pack(x, key="w", step=2))["seed"] == a.packet_seed(2, "w")
    assert packet_header(QuantCodec(8).pack(x, key="w", step=2))["seed"] == 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [2, 32, 64, 100, 128, 4096])
@pytest.mark.parametrize("shape", [(1,), (3,), (7, 9), (2, 3, 5, 7), (1000,)])
def test_quant_byte_count_equals_formula(bits, block, shape):
    n = math.prod(shape)
    values = n if bits == 8 else (n + 1) // 2
    expected = 24 + 4 * len(shape) + 12 + 2 * math.ceil(n / block) + values
    codec = QuantCodec(bits, block)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        packet = codec.pack(torch.randn(shape).to(dtype))
        assert len(packet) == expected == codec.nbytes(shape)
        assert unpack(packet).dtype == dtype


def test_int8_reaches_3_9x_fewer_bytes_than_fp32_from_block_128():
    n = 1 << 20
    x = torch.randn(n)
    fp32 = len(DenseCodec().pack(x))
    ratios = {block: fp32 / len(QuantCodec(8, block).pack(x)) for block in (64, 128, 256)}
    assert 3.87 < ratios[64] < 3.9 and ratios[128] >= 3.9 and ratios[256] >= 3.9, ratios
    assert fp32 / len(QuantCodec(4, 32).pack(x)) >= 7.1


@pytest.mark.parametrize("bits,rounding", [(8, "nearest"), (4, "stochastic"), (4, "nearest")])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_quant_block_with_non_finite_value_decodes_to_nan_with_the_same_bytes(bits, rounding, bad):
    x = torch.randn(100)
    clean = QuantCodec(bits, 32, rounding).pack(x)
    x[50] = bad
    packet = QuantCodec(bits, 32, rounding).pack(x)
    assert len(packet) == len(clean)
    y = unpack(packet)
    assert torch.isnan(y[32:64]).all()                    # the block holding it: NaN
    assert torch.equal(y[:32], unpack(clean)[:32]) and torch.equal(y[64:], unpack(clean)[64:])


def test_quant_bad_parameters():
    for kwargs in ({"bits": 2}, {"bits": 8, "block": 3}, {"bits": 4, "block": 0}, {"bits": 8, "block": 2**25},
                   {"rounding": "up"}, {"bits": True}):
        with pytest.raises(ValueError):
            QuantCodec(**kwargs)


def test_quant_zero_subnormal_and_huge_blocks_keep_the_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(64), torch.randn(64, generator=g) * 1e-40, torch.randn(64, generator=g) * 1e38])
    for bits in (8, 4):
        y = unpack(QuantCodec(bits, 64).pack(x))
        assert torch.equal(y[:64], torch.zeros(64))
        s = block_scales(x, 64, 127 if bits == 8 else 7)
        assert torch.all((y - x).abs() <= s / 2 * (1 + 1e-6))


def test_quant_packets_with_values_or_scales_out_of_range_raise():
    x = torch.randn(8)
    for bits, payload_edit in ((8, lambda p: p[:4] + b"\x80" + p[5:]),  # int8 value -128 (one 2-byte scale first)
                               (8, lambda p: b"\x80\xff" + p[2:]),     # negative NaN scale
                               (8, lambda p: b"\x80\x7f" + p[2:]),     # +inf scale
                               (8, lambda p: b"\xc1\x7f" + p[2:]),     # a NaN scale other than 0x7fc0
                               (4, lambda p: p[:2] + b"\x88" + p[3:]),  # int4 value -8
                               ):
        packet = bytes(QuantCodec(bits, 8).pack(x).numpy())
        hb = packet_header(packet)["header_bytes"]
        with pytest.raises(ValueError, match="corrupted"):
            unpack(reseal(packet[:hb] + payload_edit(packet[hb:])))
    odd = bytes(QuantCodec(4, 8).pack(torch.randn(3)).numpy())  # 3 values: the last nibble is padding
    with pytest.raises(ValueError, match="padding"):
        unpack(reseal(odd[:-1] + bytes([odd[-1] | 0x10])))


def test_quant_specs():
    assert get_codec("int8").name == "int8:64:nearest"
    assert get_codec("int4").block == 32
    assert get_codec("int8:128").block == 128
    c = get_codec("int8:64:stochastic")
    assert isinstance(c, QuantCodec) and c.rounding == "stochastic" and c.bits == 8
    ef = get_codec("int4:32+ef")
    assert isinstance(ef, ErrorFeedback) and ef.inner.bits == 4
    assert QuantCodec.summable and DenseCodec.summable
    assert not (TopKCodec.summable or RandomKCodec.summable or LowRankCodec.summable or ErrorFeedback.summable)
    for bad in ("int8:fp16", "int8:3", "int8:64:128", "int4:up", "int8:nearest:stochastic"):
        with pytest.raises(ValueError, match="codec spec"):
            get_codec(bad)


def test_int8_ring_allreduce_over_two_nodes_is_the_mean_within_two_rounding_steps():
    n = 3000
    res = run_nodes(node_programs.allreduce_with_codec, 2, (Network.uniform(2, "1Gbit", "1ms"), "int8", n))
    x0, x1 = res[0]["x"], res[1]["x"]
    exact = (x0 + x1) / 2
    assert torch.equal(res[0]["mean"], res[1]["mean"])
    # each element is quantised twice: a node's own chunk (scale <= max|x|/127), then the sum
    # of both chunks (scale <= 2 max|x|/127 + a little); the mean halves both errors
    big = float(torch.maximum(x0.abs(), x1.abs()).max())
    bound = (big / 127 + (2 * big + big / 127) / 127) * (1 + 2**-7) / 4
    err = (res[0]["mean"] - exact).abs()
    assert float(err.max()) <= bound
    assert float(err.max()) > 0  # quantised, not exact
    assert res[0]["sent"] == 2 * QuantCodec(8).nbytes((n // 2,))


def test_typed_stub_lists_exactly_the_extension_functions():
    import ast
    import pathlib

    stub = pathlib.Path(_C.__file__).with_name("_C.pyi")
    if not stub.exists():  # an editable install serves _C from the build tree
        stub = pathlib.Path(__file__).parents[1] / "pysim" / "_C.pyi"
    tree = ast.parse(stub.read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    exposed = {name for name in dir(_C) if not name.startswith("_")}
    assert stubbed == exposed


@pytest.mark.parametrize("spec", ["int8", "int4:32", "int8:64:stochastic", "int4:8:stochastic"])
def test_quant_header_edits_raise(spec):
    """Each edit below makes the header disagree with the payload or the format; all must raise.
    (Edits that leave a valid packet, like another source dtype, are covered by the fuzz tests.)"""
    packet = bytes(get_codec(spec).pack(torch.randn(5, 13), key="q", step=4).numpy())
    o = 24 + 4 * 2  # the parameters: seed (uint64), block (uint32)
    stochastic = packet[9] == 1
    edits = {
        "version": (4, b"\x01"), "codec id": (5, b"\x06"), "scale dtype": (6, b"\x00"), "ndim": (8, b"\x01"),
        "flags": (9, b"\x02"), "reserved": (10, b"\x01"), "payload length": (16, struct.pack("<Q", 2**64 - 1)),
        "rows": (24, struct.pack("<I", 6)), "cols": (28, struct.pack("<I", 2**32 - 1)),
        "block 0": (o + 8, struct.pack("<I", 0)), "odd block": (o + 8, struct.pack("<I", 7)),
        "block 2^25": (o + 8, struct.pack("<I", 2**25)), "block 2": (o + 8, struct.pack("<I", 2)),
    }
    if not stochastic:
        edits["seed with nearest rounding"] = (o, struct.pack("<Q", 1))
    for what, (at, new) in edits.items():
        edited = packet[:at] + new + packet[at + len(new):]
        with pytest.raises(ValueError):
            unpack(reseal(edited))
            pytest.fail(f"edit of the {what} was accepted")
    for cut in range(len(packet)):
        with pytest.raises(ValueError):
            unpack(reseal(packet[:cut]) if cut >= 16 else packet[:cut])


def _crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli, reflected, polynomial 0x82F63B78) one bit at a time: the reference."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_a_bitwise_reference_across_its_three_block_loop_and_chains():
    assert _C.crc32c(np.frombuffer(b"123456789", np.uint8), 0) == 0xE3069283   # the standard check value
    rng = np.random.default_rng(7)
    # three 2 KiB blocks, then three 256-byte blocks, are checksummed at once and joined: lengths
    # around 6 KiB, 768 bytes and their sums
    for n in (0, 1, 7, 8, 9, 767, 768, 769, 1543, 2920, 6143, 6144, 6145, 6144 + 768, 12288, 12288 + 13, 20000):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert _C.crc32c(data, 0) == _crc32c_bitwise(data.tobytes()), n
        for cut in {0, n // 3, n - 1} if n else ():
            assert _C.crc32c(data[cut:], _C.crc32c(data[:cut], 0)) == _C.crc32c(data, 0)   # a continuation


# ---------------------------------------------------------------- top-k with 2-bit values (SparseLoCo's)


def bf16_up(v: float) -> float:
    """The smallest bfloat16 >= v >= 0, by hand."""
    b = torch.tensor([v]).view(torch.int32).item()
    return torch.tensor([(b >> 16) + (b & 0xFFFF != 0) << 16], dtype=torch.int32).view(torch.float32).item()


def test_int2_topk_bytes_by_hand():
    # 1000 elements, k = 20: header 24 + 4 (shape) + 12 (k, block); values 2 * ceil(20/64) scale bytes + ceil(20/4)
    # code bytes; Elias-Fano indices with L = floor(log2(1000/20)) = 5: ceil(20*5/8) + ceil((20 + (999 >> 5) + 1)/8)
    ef = math.ceil(20 * 5 / 8) + math.ceil((20 + (999 >> 5) + 1) / 8)
    expected = 24 + 4 + 12 + 2 * 1 + 5 + ef
    c = get_codec("topk:20:int2")
    assert c.nbytes((1000,)) == expected == len(c.pack(torch.randn(1000)))
    raw = get_codec("topk:130:raw:int2")       # 3 blocks of 64 values (the last holds 2), 33 code bytes
    assert raw.nbytes((1000,)) == 24 + 4 + 12 + 2 * 3 + 33 + 4 * 130


def test_int2_values_are_the_nearest_of_four_levels_of_their_block():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g)
    k = 200
    packet = TopKCodec(k, "int2", block=64).pack(x)
    header, idx, val = _C.unpack_sparse(packet.numpy())
    idx, val = torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(val)
    assert torch.equal(idx, x.abs().topk(k).indices.sort().values)   # the same entries as top-k
    picked = x[idx]
    for b in range(0, k, 64):                 # by hand: s = bf16 >= absmax of the block, levels (2c - 3) s / 3
        block = picked[b:b + 64]
        s = bf16_up(block.abs().max().item())
        levels = torch.tensor([-s, -s / 3, s / 3, s])
        nearest = levels[(block[:, None] - levels[None, :]).abs().argmin(dim=1)]
        assert torch.allclose(val[b:b + 64], nearest, rtol=0, atol=1e-6 * s)
        assert ((val[b:b + 64] - block).abs() <= s / 3 * (1 + 1e-6)).all()


def test_int2_topk_refuses_corrupted_packets():
    packet = bytes(TopKCodec(10, "int2").pack(torch.randn(100)).numpy())   # 10 values: the last code byte has
    hb = packet_header(packet)["header_bytes"]                          # 2 values, 4 padding bits
    scales, codes = 2, 3
    last = hb + scales + codes - 1
    with pytest.raises(ValueError, match="padding bit"):
        unpack(reseal(packet[:last] + bytes([packet[last] | 0x40]) + packet[last + 1:]))
    with pytest.raises(ValueError, match="corrupted: a scale"):
        unpack(reseal(packet[:hb] + b"\x80\x7f" + packet[hb + 2:]))   # +inf scale
    bad_block = bytearray(packet)
    bad_block[hb - 4:hb] = (6).to_bytes(4, "little")                  # not a multiple of 4
    with pytest.raises(ValueError, match="block 6"):
        unpack(reseal(bytes(bad_block)))
    with pytest.raises(ValueError, match="multiple of 4"):
        TopKCodec(10, "int2", block=30)


def test_int2_topk_carries_nan_on():
    x = torch.randn(256)
    x[3] = float("nan")
    y = unpack(TopKCodec(8, "int2").pack(x))
    assert torch.isnan(y[3]) and torch.isnan(y[y != 0]).all()   # NaN is selected; its block decodes to NaN
