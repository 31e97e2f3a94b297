"""Dense packets moved in pieces, so that a ring hop's codec work overlaps the wire.

A ring all-reduce hop that sends a whole packet cannot start sending before it
has encoded the packet, nor reduce before the whole packet has arrived: on a
bandwidth-bound link every codec pass is added to the wire time. Here a dense
packet (``csrc/wire.hpp``) of more than :data:`PIECE_BYTES` of payload travels
as its payload in pieces of at most that size followed by its header (a
smaller one travels whole: one message costs less than two). The header's CRC-32C is chained
over the header (checksum field zero) and the pieces in order, so the sender
puts piece i on the wire while it encodes piece i+1, and the receiver decodes
and reduces piece i while piece i+1 is still arriving (``csrc/pieces.hpp``).

The bytes that cross are exactly the packet's, ``len(DenseCodec.pack(chunk))``;
only their order on the wire differs. The receiver checks the whole packet
(every header field and the checksum, with unpack's error messages) before the
collective returns.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pysim import _C
from pysim.kernel_count import record_native_kernel

PIECE_BYTES = 1 << 20  # payload bytes per piece: 1 MiB, 8.4 ms at 1 Gbit/s


class BufferPool:
    """Byte buffers reused from one collective to the next. Training all-reduces the same sizes
    every step, and a fresh multi-megabyte buffer costs a page fault per 4 KiB on first touch.
    At most ``max_bytes`` are kept between collectives (a large model's buffers are freed, as
    before, rather than held by every node while it computes)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self._free: dict[int, list[torch.Tensor]] = {}

    def take(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 buffer of ``nbytes`` (contents undefined)."""
        free = self._free.get(nbytes)
        if free:
            self.held_bytes -= nbytes
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffers: list[torch.Tensor]) -> None:
        """Returns buffers no longer in use (nothing may still read or write them)."""
        for b in buffers:
            if self.held_bytes + b.numel() <= self.max_bytes:
                self._free.setdefault(b.numel(), []).append(b)
                self.held_bytes += b.numel()


class DenseLayout:
    """Where the pieces of a dense packet of a 1-D float32 chunk of ``numel`` values lie.

    ``value_dtype``: the codec's wire dtype code (:class:`pysim.compress.DenseCodec`'s
    ``dtype``). ``pieces``: element ranges [a, b) of the chunk, in payload order.
    """

    def __init__(self, numel: int, value_dtype: int, piece_bytes: int = PIECE_BYTES) -> None:
        self.dtype = value_dtype
        self.header = _C.dense_header([numel], 0, value_dtype)   # checksum field zero
        self.header_bytes = self.header.size
        self.value_bytes = _C.dense_payload_bytes(1, value_dtype)
        self.nbytes = self.header_bytes + numel * self.value_bytes
        per = max(1, piece_bytes // self.value_bytes)
        self.pieces = [(a, min(a + per, numel)) for a in range(0, numel, per)]
        self.start_crc = _C.crc32c(self.header)   # the chain starts over the header

    def new_packet(self, pool: BufferPool) -> torch.Tensor:
        """A packet buffer from ``pool`` with the header (checksum zero) written; the payload is
        whatever the buffer held."""
        buf = pool.take(self.nbytes)
        buf[:self.header_bytes] = torch.from_numpy(self.header)
        return buf

    def piece(self, packet: torch.Tensor, i: int) -> torch.Tensor:
        """Piece ``i`` of ``packet``'s payload (a view)."""
        a, b = self.pieces[i]
        h, w = self.header_bytes, self.value_bytes
        return packet[h + a * w:h + b * w]

    def header_of(self, packet: torch.Tensor) -> torch.Tensor:
        return packet[:self.header_bytes]

    @property
    def streamed(self) -> bool:
        """Whether the packet travels in pieces; a packet of one piece gains nothing from it and
        travels whole, as one message."""
        return len(self.pieces) > 1

    def messages(self, packet: torch.Tensor) -> list[torch.Tensor]:
        """The messages that carry ``packet``, in wire order: its pieces then its header, or the
        whole packet. Piece i arrives with message ``i if streamed else 0``; the header with the last."""
        if not self.streamed:
            return [packet]
        return [self.piece(packet, i) for i in range(len(self.pieces))] + [self.header_of(packet)]

    def last_message(self, packet: torch.Tensor) -> torch.Tensor:
        """The message that completes ``packet``, sent once every piece is: its header, or the
        whole packet when it travels as one."""
        return self.header_of(packet) if self.streamed else packet

    def arrivals(self, receives: list) -> Iterator[int]:
        """Waits for the receives posted for :meth:`messages` in order: yields each piece's index
        once it has arrived, and returns once the header has. Each receive is waited exactly once
        (waiting twice on a gloo receive waits for a second message that never comes)."""
        if not self.streamed:
            receives[0].wait()
        for i in range(len(self.pieces)):
            if self.streamed:
                receives[i].wait()
            yield i
        if self.streamed:
            receives[-1].wait()

    def seal(self, packet: torch.Tensor, crc: int) -> None:
        """Writes the CRC chained over the header and every piece into the header."""
        _C.seal_header(self.header_of(packet).numpy(), crc)

    def check(self, packet: torch.Tensor, crc: int) -> None:
        """Raises ValueError unless ``packet`` (fully received) is this layout's packet and
        ``crc`` (chained over the pieces as they were decoded) is its checksum."""
        _C.check_streamed(packet.numpy(), self.header, crc)


# The piece kernels, reported to an open compute count (pysim.compute) like every C++ codec kernel.

def encode_piece(x: torch.Tensor, out: torch.Tensor, value_dtype: int, crc: int) -> int:
    """``out`` = ``x`` (float32) encoded; returns ``crc`` continued over ``out``."""
    crc = _C.encode_piece(x.numpy(), out.numpy(), value_dtype, crc)
    record_native_kernel(4 * x.numel() + out.numel())
    return crc


def add_encode_piece(got: torch.Tensor, x: torch.Tensor, out: torch.Tensor, value_dtype: int,
                     crc_got: int, crc_out: int) -> tuple[int, int]:
    """``out`` = encode(decode(``got``) + ``x``); returns the crcs continued over got and out."""
    crcs = _C.add_encode_piece(got.numpy(), x.numpy(), out.numpy(), value_dtype, crc_got, crc_out)
    record_native_kernel(got.numel() + 4 * x.numel() + out.numel())
    return crcs


def decode_piece(got: torch.Tensor, out: torch.Tensor, value_dtype: int, divisor: float, crc: int) -> int:
    """``out`` (float32) = decode(``got``) / ``divisor``; returns ``crc`` continued over got."""
    crc = _C.decode_piece(got.numpy(), out.numpy(), value_dtype, divisor, crc)
    record_native_kernel(got.numel() + 4 * out.numel())
    return crc

