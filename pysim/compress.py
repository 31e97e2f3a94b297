"""Codecs that turn tensors into real wire packets (and back).

Every codec's ``pack`` returns a 1-D ``torch.uint8`` tensor: the packet that
crosses between node processes. The network is charged exactly ``len(packet)``
bytes. ``unpack`` validates the packet (size, CRC-32C checksum, structure) and
raises ``ValueError`` for anything truncated, corrupted or foreign.

Codecs, by spec string (see :func:`get_codec`):

- ``dense[:fp32|fp16|bf16]``   all values.
- ``topk:K[:ef|raw][:fp32|fp16|bf16|int2]``  the K entries of largest magnitude; K is
  a count (``topk:1000``) or a fraction (``topk:0.01``). Indices are sorted and
  Elias-Fano coded (``ef``, default) or raw int32 (``raw``, for comparison).
  ``int2``: values in 2 bits (four levels per block of 64, bf16 scales).
- ``randomk:P[:seed][:dtype]``  a fraction P of entries chosen by a seed shared by
  all nodes; no index bytes on the wire.
- ``lowrank:R[:dtype]``  one PowerSGD round of rank R with a warm-started Q.
- ``int8[:BLOCK][:nearest|stochastic]``, ``int4[:BLOCK][:...]``  block-absmax
  quantisation: one bf16 scale per BLOCK values (default 64 for int8, 32 for
  int4), values rounded to nearest (default) or stochastically.

Append ``+ef`` to any spec for error feedback.

Packet size in bytes (``ndim`` = tensor rank, ``b`` = bytes per value):

- header: ``24 + 4*ndim`` plus 0 (dense), 8 (topk), 16 (randomk), 8 (lowrank)
- header of topk int2: ``24 + 4*ndim + 12``; its values ``2*ceil(k/64) + ceil(k/4)``.
- dense: ``numel*b``; topk: ``k*b`` + index bytes (raw: ``4k``; Elias-Fano:
  ``ceil(k*L/8) + ceil((k + ((n-1) >> L) + 1)/8)`` with ``L = floor(log2(n/k))``);
  randomk: ``k*b``; lowrank: ``(rows + cols)*rank*b``.
- header of int8/int4: ``24 + 4*ndim + 12``; payload ``2*ceil(n/block)`` scale
  bytes plus ``n`` (int8) or ``ceil(n/2)`` (int4) value bytes. Against fp32
  that is ``4*block/(block + 2)`` fewer bytes for int8 (3.88x at block 64,
  3.94x at 128: the 3.9x mark needs block >= 128) and ``4*block/(block/2 + 2)``
  for int4 (7.11x at 32, 7.53x at 64), headers aside.

Decoding is bounded: ``unpack`` refuses, with ``ValueError`` and before
allocating the tensor, a packet whose shape differs from ``expect_shape`` or
whose tensor has more than ``max_numel`` elements (when neither is given:
:data:`DEFAULT_MAX_NUMEL` = 2**26, a budget of 256 MiB of decoded float32). A
sparse or low-rank packet of a few dozen bytes can legitimately describe a huge
tensor, so callers that know the shape pass it, and a larger tensor without one
needs an explicit ``max_numel``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from pysim import _C
from pysim.kernel_count import record_native_kernel

DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
_TORCH_TO_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_TO_TORCH = {v: k for k, v in _TORCH_TO_CODE.items()}
_CODEC_IDS = {"dense": 0, "topk": 1, "randomk": 2, "lowrank": 3, "int8": 4, "int4": 5, "topk2": 6}
INT2_BLOCK = 64   # values per bf16 scale of 2-bit top-k values
INDEX_CODES = {"ef": 0, "raw": 1}
ROUNDINGS = ("nearest", "stochastic")
DEFAULT_MAX_NUMEL = 2**26  # elements unpack accepts when the caller gives no bound: 256 MiB of float32


def _flat_f32(x: torch.Tensor) -> tuple[np.ndarray, list[int], int]:
    """A float32 NumPy view of ``x`` (copied only if needed), its shape and dtype code."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _TORCH_TO_CODE:
        raise ValueError(f"codecs take float32, float16 or bfloat16 tensors, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"codecs take CPU tensors, got a tensor on {x.device}")
    shape = list(x.shape)
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    return flat.contiguous().numpy(), shape, _TORCH_TO_CODE[x.dtype]


def _packet_array(packet: torch.Tensor | bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(packet, torch.Tensor):
        if packet.dtype != torch.uint8 or packet.dim() != 1:
            raise ValueError("a packet must be a 1-D torch.uint8 tensor")
        return packet.contiguous().numpy()
    if isinstance(packet, np.ndarray):
        if packet.dtype != np.uint8 or packet.ndim != 1:
            raise ValueError("a packet must be a 1-D uint8 array")
        return np.ascontiguousarray(packet)
    if isinstance(packet, memoryview) and not packet.c_contiguous:
        raise ValueError("a packet must be a contiguous buffer of bytes; copy the memoryview with bytes(view)")
    if isinstance(packet, (bytes, bytearray, memoryview)):
        return np.frombuffer(packet, dtype=np.uint8)
    raise ValueError(f"a packet must be a uint8 tensor or bytes, got {type(packet).__name__}")


def _to_torch(flat: np.ndarray, header: dict) -> torch.Tensor:
    out = torch.from_numpy(flat).reshape(header["shape"])
    dtype = _CODE_TO_TORCH[header["source_dtype"]]
    return out if dtype == torch.float32 else out.to(dtype)


def _dtype_code(name: str) -> int:
    if name not in DTYPE_CODES:
        raise ValueError(f"unknown value dtype {name!r}; use one of {', '.join(DTYPE_CODES)}")
    return DTYPE_CODES[name]


def packet_header(packet) -> dict:
    """The validated header of a packet as a dict (codec, shape, k, seed, rank, sizes in bytes)."""
    return _C.parse_header(_packet_array(packet))


def header_bytes(codec: str, ndim: int) -> int:
    """Header size in bytes of a packet of ``codec`` for a tensor with ``ndim`` dimensions."""
    return _C.header_bytes(_CODEC_IDS[codec], ndim)


def split_packets(bundle) -> list[torch.Tensor]:
    """Splits a concatenation of packets (a *bundle*) at the lengths their headers give. The
    packets are views of the bundle (of a copy when it is read-only, such as ``bytes``: torch
    tensors are writable)."""
    buf = _packet_array(bundle)
    if not buf.flags.writeable:
        buf = buf.copy()
    out, offset = [], 0
    while offset < buf.size:
        try:
            length = _C.packet_length(buf[offset:])
        except ValueError as e:
            raise ValueError(f"bundle corrupted at byte {offset}: {e}") from None
        if length > buf.size - offset:
            raise ValueError("bundle truncated: the last packet is incomplete")
        out.append(torch.from_numpy(buf[offset:offset + length]))
        offset += length
    return out


def _decode_limits(expect_shape, max_numel) -> tuple[int, list[int] | None]:
    """Checks unpack's keywords; returns (max_numel, expected shape as a list or None)."""
    shape = None
    if expect_shape is not None:
        shape = list(expect_shape)
        if len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**32
                                     for d in shape):
            raise ValueError(f"expect_shape must be at most 8 sizes in [0, 2**32), got {expect_shape!r}")
    if max_numel is None:
        max_numel = math.prod(shape) if shape is not None else DEFAULT_MAX_NUMEL
    elif isinstance(max_numel, bool) or not isinstance(max_numel, int) or not 0 <= max_numel < 2**64:
        raise ValueError(f"max_numel must be an integer in [0, 2**64), got {max_numel!r}")
    return max_numel, shape


def unpack(packet, *, expect_shape: tuple[int, ...] | torch.Size | None = None,
           max_numel: int | None = None) -> torch.Tensor:
    """Decodes any pysim packet into a dense tensor of its source shape and dtype.

    Raises ``ValueError`` for a malformed packet and, before allocating the
    tensor, when its shape is not ``expect_shape`` or it has more than
    ``max_numel`` elements (default: the expected shape's size, else
    :data:`DEFAULT_MAX_NUMEL` = 2**26, 256 MiB of float32).
    """
    limit, shape = _decode_limits(expect_shape, max_numel)
    buf = _packet_array(packet)
    header, flat = _C.unpack(buf, limit, shape)
    # a low-rank packet is expanded as P Q^T: 2 * numel * rank FLOPs
    flops = 2.0 * flat.size * header["rank"] if header["codec"] == "lowrank" else 0.0
    record_native_kernel(buf.nbytes + flat.nbytes, flops)
    return _to_torch(flat, header)


def _packet_seed(seed: int, step: int, key: str) -> int:
    """The per-packet seed for (codec seed, tensor name, step)."""
    return _C.derive_seed(_C.derive_seed(seed, zlib.crc32(key.encode())), step)


class Codec:
    """Base class: ``pack(x) -> uint8 packet``, ``unpack(packet) -> tensor``, ``nbytes(shape)``.

    ``key`` names the tensor for codecs that keep state per tensor (low-rank
    warm start, error feedback); ``step`` varies the random choices (random-k
    indices, stochastic rounding). ``summable``: packets can be decoded, added
    and re-packed hop by hop (a ring all-reduce), as dense and quantised values
    can; sparse and low-rank packets are all-gathered instead. ``fixed_work``:
    packing and unpacking a tensor of one shape run the same kernels on the same
    bytes every time (a packet's size depends on the shape alone), so a block
    that packs or unpacks with it is counted once and reused (every built-in
    codec; False, the default, for a codec whose packets depend on the values).
    """

    name = "codec"
    lossy = True
    summable: bool = False
    fixed_work: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "fixed_work" not in cls.__dict__:   # a subclass says so itself: its packets may depend on values
            cls.fixed_work = False

    def state_of(self, key: str) -> object:
        """What this codec keeps for ``key`` that changes its work (for :attr:`fixed_work`:
        whether a warm start or residual exists yet); None: nothing."""
        return None

    def pack(self, x: torch.Tensor, *, key: str = "", step: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, packet, *, expect_shape: tuple[int, ...] | torch.Size | None = None,
               max_numel: int | None = None) -> torch.Tensor:
        """Decodes a packet; see :func:`unpack` for the keywords."""
        return unpack(packet, expect_shape=expect_shape, max_numel=max_numel)

    def nbytes(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Exact packet size in bytes for a tensor of this shape."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class DenseCodec(Codec):
    """All values, as fp32, fp16 or bf16 on the wire."""

    fixed_work = True

    summable = True

    def __init__(self, dtype: str = "fp32") -> None:
        self.dtype = _dtype_code(dtype)
        self.name = f"dense:{dtype}"
        self.lossy = dtype != "fp32"

    def pack(self, x: torch.Tensor, *, key: str = "", step: int = 0) -> torch.Tensor:
        flat, shape, src = _flat_f32(x)
        packet = _C.pack_dense(flat, shape, src, self.dtype)
        record_native_kernel(flat.nbytes + packet.nbytes)
        return torch.from_numpy(packet)

    def nbytes(self, shape) -> int:
        shape = list(shape)
        return _C.header_bytes(0, len(shape)) + _C.dense_payload_bytes(math.prod(shape), self.dtype)


class TopKCodec(Codec):
    """The k entries of largest magnitude, with sorted, compactly coded indices.

    ``k`` is a count (int >= 1) or a fraction of the tensor (float in (0, 1]).
    NaN ranks above every magnitude (inf included) and is sent like any large entry.
    ``value_dtype="int2"``: each value in 2 bits, one of four levels -s, -s/3, s/3, s
    with s the bf16 absmax of its block of ``block`` values (SparseLoCo's 2-bit
    values; the ``topk2`` wire codec: ``2*ceil(k/block) + ceil(k/4)`` value bytes).
    """

    fixed_work = True

    def __init__(self, k: int | float, value_dtype: str = "fp32", index_code: str = "ef",
                 block: int = INT2_BLOCK) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"top-k k must be a count or a fraction, got {k!r}")
        if isinstance(k, float) and not (0.0 < k <= 1.0):
            raise ValueError(f"top-k fraction must be in (0, 1], got {k}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"top-k count must be >= 1, got {k}")
        if not isinstance(index_code, str) or index_code not in INDEX_CODES:
            raise ValueError(f"unknown index code {index_code!r}; use 'ef' (Elias-Fano) or 'raw'")
        self.k = k
        self.int2 = value_dtype == "int2"
        self.dtype = _dtype_code("bf16" if self.int2 else value_dtype)
        self.block = block
        if self.int2:
            _C.topk2_payload_bytes(block, 1, block, 0)   # checks the block size
        self.index_code = INDEX_CODES[index_code]
        self.name = f"topk:{k}:{index_code}:{value_dtype}" + (f"/{block}" if self.int2 and block != INT2_BLOCK else "")

    def count(self, numel: int) -> int:
        """Number of entries kept for a tensor of ``numel`` elements: a fraction of them (at least
        one), or the count, all of a tensor that has fewer (``topk:12`` keeps a 10-value bias whole)."""
        if isinstance(self.k, float):
            return max(1, min(numel, round(self.k * numel)))
        return min(self.k, numel)

    def pack(self, x: torch.Tensor, *, key: str = "", step: int = 0) -> torch.Tensor:
        flat, shape, src = _flat_f32(x)
        k = self.count(flat.size)
        packet = _C.pack_topk2(flat, shape, src, k, self.block, self.index_code) if self.int2 else \
            _C.pack_topk(flat, shape, src, k, self.dtype, self.index_code)
        record_native_kernel(2 * flat.nbytes + packet.nbytes)  # x is read by the selection and by the gather
        return torch.from_numpy(packet)

    def nbytes(self, shape) -> int:
        shape = list(shape)
        n = math.prod(shape)
        if self.int2:
            return _C.header_bytes(6, len(shape)) + _C.topk2_payload_bytes(n, self.count(n), self.block,
                                                                           self.index_code)
        return _C.header_bytes(1, len(shape)) + _C.topk_payload_bytes(
            n, self.count(n), self.dtype, self.index_code
        )


class RandomKCodec(Codec):
    """A fraction ``p`` of entries chosen from a shared seed; only values cross the wire.

    The index set depends only on ``(seed, step, numel)``: every node that packs
    with the same seed and step keeps the same entries.
    """

    fixed_work = True

    def __init__(self, p: float, seed: int = 0, value_dtype: str = "fp32") -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"random-k fraction p must be in (0, 1], got {p!r}")
        self.p = float(p)
        self.seed = int(seed)
        self.dtype = _dtype_code(value_dtype)
        self.name = f"randomk:{p}:{seed}:{value_dtype}"

    def count(self, numel: int) -> int:
        return max(1, min(numel, round(self.p * numel)))

    def packet_seed(self, step: int, key: str = "") -> int:
        """The seed written into the packet for this step and tensor name."""
        return _packet_seed(self.seed, step, key)

    def indices(self, numel: int, step: int, key: str = "") -> torch.Tensor:
        """The sorted indices (int64) kept at this step."""
        idx = _C.randomk_indices(self.packet_seed(step, key), numel, self.count(numel))
        return torch.from_numpy(idx.astype(np.int64))

    def pack(self, x: torch.Tensor, *, key: str = "", step: int = 0) -> torch.Tensor:
        flat, shape, src = _flat_f32(x)
        seed, k = self.packet_seed(step, key), self.count(flat.size)
        packet = _C.pack_randomk(flat, shape, src, k, seed, self.dtype)
        record_native_kernel(8 * k + packet.nbytes)  # k indices drawn, k values gathered
        return torch.from_numpy(packet)

    def nbytes(self, shape) -> int:
        shape = list(shape)
        return _C.header_bytes(2, len(shape)) + _C.randomk_payload_bytes(
            self.count(math.prod(shape)), self.dtype
        )


class LowRankCodec(Codec):
    """PowerSGD compression of rank ``rank``: M ~= P Q^T with a warm-started Q per ``key``.

    A tensor is viewed as ``shape[0] x (numel / shape[0])``. 1-D tensors, and
    matrices for which the factors would not be smaller than the matrix, are
    sent dense (fp32).
    """

    fixed_work = True

    def __init__(self, rank: int, seed: int = 0, value_dtype: str = "fp32") -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"low-rank rank must be an integer >= 1, got {rank!r}")
        self.rank = rank
        self.seed = seed
        self.dtype = _dtype_code(value_dtype)
        self.name = f"lowrank:{rank}:{value_dtype}"
        self.warm_start: dict[str, torch.Tensor] = {}
        self._dense = DenseCodec("fp32")

    def state_of(self, key: str) -> object:
        return key in self.warm_start   # the first pack of a key draws its Q

    def compresses(self, shape) -> bool:
        """Whether a tensor of this shape is sent as factors (else dense)."""
        shape = list(shape)
        if len(shape) < 2:
            return False
        rows = shape[0]
        cols = math.prod(shape) // max(rows, 1)
        return rows > 0 and cols > 0 and (rows + cols) * self.rank < rows * cols

    def initial_q(self, cols: int, key: str = "") -> torch.Tensor:
        gen = torch.Generator().manual_seed(_C.derive_seed(self.seed, zlib.crc32(key.encode())) >> 1)
        return torch.randn(cols, self.rank, generator=gen)

    def pack(self, x: torch.Tensor, *, key: str = "", step: int = 0) -> torch.Tensor:
        if not self.compresses(x.shape):
            return self._dense.pack(x)
        flat, shape, src = _flat_f32(x)
        rows = shape[0]
        cols = flat.size // rows
        q = self.warm_start.get(key)
        if q is None or tuple(q.shape) != (cols, self.rank):
            q = self.initial_q(cols, key)
            self.warm_start[key] = q
        packet = _C.pack_lowrank(flat, shape, src, rows, q.numpy(), self.dtype)
        # P = M Q and Q = M^T P (2 * numel * rank FLOPs each), P orthonormalised (2 * rows * rank^2)
        record_native_kernel(2 * flat.nbytes + 2 * q.numel() * 4 + packet.nbytes,
                             4.0 * flat.size * self.rank + 2.0 * rows * self.rank ** 2)
        return torch.from_numpy(packet)

    def nbytes(self, shape) -> int:
        shape = list(shape)
        if not self.compresses(shape):
            return self._dense.nbytes(shape)
        rows = shape[0]
        cols = math.prod(shape) // rows
        return _C.header_bytes(3, len(shape)) + _C.lowrank_payload_bytes(rows, cols, self.rank, self.dtype)


class QuantCodec(Codec):
    """Block-absmax quantisation to ``bits`` = 8 or 4 bits per value.

    Each block of ``block`` consecutive values (default 64 for int8, 32 for
    int4; even, in [2, 2**24]) shares one scale s = absmax / Q (Q = 127 for
    int8, 7 for int4) rounded up to bfloat16 (2 bytes). Values are
    round(x / s) in [-Q, Q]: with ``rounding="nearest"`` the error is at most
    s/2 per element; with ``"stochastic"`` it is below s and zero in
    expectation, the random draw coming from a hash of the packet seed (from
    ``seed``, ``key`` and ``step``, like :meth:`RandomKCodec.packet_seed`) and
    the element index, so packing is reproducible and unpacking deterministic.
    A block holding NaN or inf is sent with a NaN scale and decodes to NaN (the
    same bytes: a diverging run sends what a real one would, and notices its loss).
    """

    fixed_work = True

    summable = True

    def __init__(self, bits: int = 8, block: int | None = None, rounding: str = "nearest", seed: int = 0) -> None:
        if bits not in (8, 4) or isinstance(bits, bool):
            raise ValueError(f"quantisation bits must be 8 or 4, got {bits!r}")
        block = (64 if bits == 8 else 32) if block is None else block
        if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block > 2**24 or block % 2:
            raise ValueError(f"quantisation block size must be an even integer in [2, 2**24], got {block!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}; use 'nearest' or 'stochastic'")
        self.bits, self.block, self.rounding, self.seed = bits, block, rounding, int(seed)
        self.name = f"int{bits}:{block}:{rounding}"

    def packet_seed(self, step: int, key: str = "") -> int:
        """The seed written into a stochastic-rounding packet for this step and tensor name."""
        return _packet_seed(self.seed, step, key)

    def pack(self, x: torch.Tensor, *, key: str = "", step: int = 0) -> torch.Tensor:
        flat, shape, src = _flat_f32(x)
        stochastic = self.rounding == "stochastic"
        seed = self.packet_seed(step, key) if stochastic else 0
        packet = _C.pack_quant(flat, shape, src, self.bits, self.block, stochastic, seed)
        record_native_kernel(flat.nbytes + packet.nbytes)
        return torch.from_numpy(packet)

    def nbytes(self, shape) -> int:
        shape = list(shape)
        return _C.header_bytes(_CODEC_IDS[f"int{self.bits}"], len(shape)) + _C.quant_payload_bytes(
            math.prod(shape), self.bits, self.block)


class ErrorFeedback(Codec):
    """Wraps a lossy codec with error feedback (residual accumulation).

    For each ``key``: ``c = x + residual``; the packet encodes ``c``; and
    ``residual = c - unpack(packet)``, so what one step drops is sent later.
    """

    def __init__(self, codec: Codec) -> None:
        self.inner = codec
        self.name = f"ef({codec.name})"
        self.residual: dict[str, torch.Tensor] = {}
        self.fixed_work = codec.fixed_work

    def state_of(self, key: str) -> object:
        return key in self.residual, self.inner.state_of(key)   # a key's first call has no residual yet

    def pack(self, x: torch.Tensor, *, key: str = "", step: int = 0) -> torch.Tensor:
        r = self.residual.get(key)
        corrected = x.detach().float() + r if r is not None else x.detach().float()
        packet = self.inner.pack(corrected, key=key, step=step)
        self.residual[key] = corrected - self.inner.unpack(packet, expect_shape=corrected.shape).float()
        return packet

    def unpack(self, packet, *, expect_shape: tuple[int, ...] | torch.Size | None = None,
               max_numel: int | None = None) -> torch.Tensor:
        return self.inner.unpack(packet, expect_shape=expect_shape, max_numel=max_numel)

    def nbytes(self, shape) -> int:
        return self.inner.nbytes(shape)


# PowerSGD's products outside a packet (pysim.strategies.reducers), with C++ kernels counted as compute.

def lowrank_mq(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P = M Q for M (rows x cols) and Q (cols x rank), float32."""
    p = _C.lowrank_mq(m.contiguous().numpy(), q.contiguous().numpy())
    record_native_kernel(4 * (m.numel() + q.numel()) + p.nbytes, 2.0 * m.numel() * q.shape[1])
    return torch.from_numpy(p)


def lowrank_mtp(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Q = M^T P for M (rows x cols) and P (rows x rank), float32."""
    q = _C.lowrank_mtp(m.contiguous().numpy(), p.contiguous().numpy())
    record_native_kernel(4 * (m.numel() + p.numel()) + q.nbytes, 2.0 * m.numel() * p.shape[1])
    return torch.from_numpy(q)


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """P with orthonormal columns (Gram-Schmidt, in order), as a new tensor."""
    out = _C.orthonormalize(p.contiguous().numpy())
    record_native_kernel(2 * out.nbytes, 2.0 * p.shape[0] * p.shape[1] ** 2)
    return torch.from_numpy(out)


def sparse_entries(packet, expect_shape: tuple[int, ...] | torch.Size | None = None,
                   max_numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (indices, values) a top-k or random-k packet carries: int64 positions in the flattened
    tensor (sorted) and float32 values; checked like :func:`unpack`."""
    limit, shape = _decode_limits(expect_shape, max_numel)
    buf = _packet_array(packet)
    _, idx, val = _C.unpack_sparse(buf, limit, shape)
    record_native_kernel(buf.nbytes + idx.nbytes + val.nbytes)
    return torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(val)


def get_codec(spec: str | Codec | None) -> Codec:
    """A codec from its spec string (``"dense:fp16"``, ``"topk:0.01"``, ``"randomk:0.01"``,
    ``"lowrank:4"``, ``"int8"``, ``"int4:32"``, ``"int8:64:stochastic"``; append ``+ef`` for
    error feedback), or the codec itself."""
    if spec is None:
        return DenseCodec()
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"codec spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    ef = text.endswith("+ef")
    if ef:
        text = text[:-3]
    name, *args = text.split(":")
    dtypes = [a for a in args if a in DTYPE_CODES]
    rest = [a for a in args if a not in DTYPE_CODES]
    dtype = dtypes[-1] if dtypes else "fp32"
    hint = 'e.g. "dense:fp16", "topk:0.01", "randomk:0.01", "lowrank:4", "int8:64:stochastic"'
    try:
        if name == "dense" and not rest:
            codec: Codec = DenseCodec(dtype)
        elif name == "topk" and 1 <= len(rest) - ("int2" in rest) <= 2 and rest.count("int2") <= 1:
            value = "int2" if "int2" in rest else dtype
            rest = [a for a in rest if a != "int2"]
            k: int | float = float(rest[0]) if any(c in rest[0] for c in ".eE") else int(rest[0])
            codec = TopKCodec(k, value, rest[1] if len(rest) == 2 else "ef")
        elif name == "randomk" and 1 <= len(rest) <= 2:
            codec = RandomKCodec(float(rest[0]), int(rest[1]) if len(rest) == 2 else 0, dtype)
        elif name == "lowrank" and len(rest) == 1:
            codec = LowRankCodec(int(rest[0]), value_dtype=dtype)
        elif name in ("int8", "int4") and not dtypes and len(rest) <= 2:
            rounding = [a for a in rest if a in ROUNDINGS]
            blocks = [a for a in rest if a not in ROUNDINGS]
            if len(rounding) > 1 or len(blocks) > 1:
                raise ValueError(f"unknown codec spec {spec!r}; {hint}")
            codec = QuantCodec(int(name[3]), int(blocks[0]) if blocks else None,
                               rounding[0] if rounding else "nearest")
        else:
            raise ValueError(f"unknown codec spec {spec!r}; {hint}")
    except ValueError as e:
        if "codec spec" in str(e) or "must" in str(e) or "unknown" in str(e):
            raise ValueError(f"bad codec spec {spec!r}: {e}") from None
        raise ValueError(f"bad codec spec {spec!r}: {e}; {hint}") from None
    return ErrorFeedback(codec) if ef else codec
