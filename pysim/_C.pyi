"""Typed stub of pysim._C, the compression core (csrc/bindings.cpp).

Arrays are NumPy arrays (torch tensors convert with ``.numpy()``); packets are
1-D contiguous uint8 buffers. Errors in arguments or packets raise ValueError.
Dtype codes: 0 = fp32, 1 = fp16, 2 = bf16. Codec ids: 0 dense, 1 topk,
2 randomk, 3 lowrank, 4 int8, 5 int4.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]

def set_num_threads(n: int) -> None:
    """Threads the kernels may use for large inputs (default: min(8, cores))."""

def get_num_threads() -> int: ...
def header_bytes(codec: int, ndim: int) -> int:
    """Header size in bytes for a codec id and tensor rank."""

def dense_payload_bytes(numel: int, value_dtype: int) -> int: ...
def topk_payload_bytes(numel: int, k: int, value_dtype: int, index_code: int) -> int: ...
def randomk_payload_bytes(k: int, value_dtype: int) -> int: ...
def lowrank_payload_bytes(rows: int, cols: int, rank: int, value_dtype: int) -> int: ...
def quant_payload_bytes(numel: int, bits: int, block: int) -> int: ...
def topk2_payload_bytes(numel: int, k: int, block: int, index_code: int) -> int: ...
def elias_fano_bytes(n: int, k: int) -> int: ...
def crc32c(data: Buffer, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of a byte buffer, as the packet checksum uses it; crc continues an earlier one."""

def packet_length(packet: Buffer) -> int:
    """Header + payload bytes that the packet starting this buffer announces."""

def peak_buffer_bytes(reset: bool = True) -> int:
    """Most bytes the extension's buffers held at once since the last reset (then resets to the current)."""

def pack_dense(x: F32, shape: Sequence[int], source_dtype: int, value_dtype: int) -> U8: ...
def pack_topk(x: F32, shape: Sequence[int], source_dtype: int, k: int, value_dtype: int, index_code: int) -> U8: ...
def pack_topk2(x: F32, shape: Sequence[int], source_dtype: int, k: int, block: int, index_code: int) -> U8:
    """Top-k with 2-bit values (four levels per block of values, bf16 scales)."""
def pack_randomk(x: F32, shape: Sequence[int], source_dtype: int, k: int, seed: int, value_dtype: int) -> U8: ...
def pack_lowrank(x: F32, shape: Sequence[int], source_dtype: int, rows: int, q: F32, value_dtype: int) -> U8:
    """One PowerSGD round; q (cols x rank, float32) is updated in place to the new Q."""

def pack_quant(x: F32, shape: Sequence[int], source_dtype: int, bits: int, block: int, stochastic: bool,
               seed: int) -> U8:
    """Block-absmax int8/int4 quantisation (bf16 scales); seed is used by stochastic rounding only."""

def dense_header(shape: Sequence[int], source_dtype: int, value_dtype: int) -> U8:
    """The header of a dense packet of this shape, checksum field zero."""

def seal_header(header: U8, crc: int) -> None:
    """Writes the chained CRC into a streamed packet's header."""

def encode_piece(x: F32, out: U8, value_dtype: int, crc: int) -> int:
    """out = x encoded; returns crc continued over out."""

def add_encode_piece(got: Buffer, x: F32, out: U8, value_dtype: int, crc_got: int, crc_out: int) -> tuple[int, int]:
    """out = encode(decode(got) + x); returns the crcs continued over got and over out."""

def decode_piece(got: Buffer, out: F32, value_dtype: int, divisor: float, crc: int) -> int:
    """out = decode(got) / divisor; returns crc continued over got."""

def check_streamed(packet: Buffer, expected_header: Buffer, crc: int) -> None:
    """Raises ValueError unless a streamed packet is the expected one with the chained CRC."""

class RingBatch:
    """A ring all-reduce's hops run in memory between the members of one process (ring.hpp)."""

    def __init__(self, arena: U8, xs: list[F32], rs: list[F32], size: int, value_dtype: int) -> None: ...
    def run(self, hops: Any) -> None:
        """Runs the hops (rows of mode, in_off, out_off, row, a, b, divisor) in order; ValueError for a bad packet."""

def dense_packet_bytes(n: int, value_dtype: int) -> int:
    """Bytes of a 1-D dense packet of n values."""

def parse_header(packet: Buffer) -> dict[str, Any]:
    """Validates a packet (size, checksum, structure) and returns its header as a dict."""

def unpack(packet: Buffer, max_numel: int = 67108864,
           expect_shape: Sequence[int] | None = None) -> tuple[dict[str, Any], F32]:
    """Decodes any packet to (header, flat float32 array); refuses tensors over max_numel or not of expect_shape."""

def unpack_factors(packet: Buffer, max_numel: int = 67108864,
                   expect_shape: Sequence[int] | None = None) -> tuple[dict[str, Any], F32, F32]:
    """Decodes a low-rank packet to (header, P rows x rank, Q cols x rank)."""

def unpack_sparse(packet: Buffer, max_numel: int = 67108864,
                  expect_shape: Sequence[int] | None = None) -> tuple[dict[str, Any], U32, F32]:
    """Decodes a top-k or random-k packet to (header, sorted indices uint32, values float32)."""

def topk_select(x: F32, k: int) -> U32:
    """Sorted indices of the k largest |x|."""

def randomk_indices(seed: int, n: int, k: int) -> U32:
    """The k sorted indices a random-k packet with this seed uses."""

def derive_seed(seed: int, step: int) -> int: ...
def lowrank_mq(M: F32, Q: F32) -> F32:
    """P = M @ Q, reading M once."""

def lowrank_mtp(M: F32, P: F32) -> F32:
    """Q = M.T @ P, reading M once."""

def maxpool2x2(x: F32, out: F32, index: np.ndarray) -> None:
    """2x2 max pooling, stride 2, of float32 planes x (planes, h, w) into out (planes, h/2, w/2),
    with the argmax of each window (row * w + column) in the int64 index; torch's rule, bit for bit."""

def orthonormalize(P: F32) -> F32:
    """Orthonormalises the columns of P in place (Gram-Schmidt) and returns it."""
