"""Dense packets piece by piece: the same bytes as whole packets, checked before they are trusted."""

import numpy as np
import pytest
import torch

from pysim import _C
from pysim.compress import DenseCodec
from pysim.compute import Work, count_work
from pysim.pieces import BufferPool, DenseLayout, add_encode_piece, decode_piece, encode_piece

DTYPES = {"fp32": 0, "fp16": 1, "bf16": 2}


def streamed(x: torch.Tensor, dtype: str, piece_bytes: int) -> tuple[DenseLayout, torch.Tensor]:
    lay = DenseLayout(x.numel(), DTYPES[dtype], piece_bytes)
    packet, crc = lay.new_packet(BufferPool()), lay.start_crc
    for i, (a, b) in enumerate(lay.pieces):
        crc = encode_piece(x[a:b], lay.piece(packet, i), lay.dtype, crc)
    lay.seal(packet, crc)
    return lay, packet


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,piece_bytes", [(1000, 256), (1000, 1 << 19), (1, 4), (0, 64), (777, 100)])
def test_a_packet_encoded_in_pieces_is_the_whole_packet(dtype, n, piece_bytes):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    lay, packet = streamed(x, dtype, piece_bytes)
    assert torch.equal(packet, DenseCodec(dtype).pack(x))
    assert lay.nbytes == DenseCodec(dtype).nbytes((n,)) == packet.numel()
    assert [a for a, _ in lay.pieces] == list(range(0, n, max(1, piece_bytes // (4 if dtype == "fp32" else 2))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_and_decode_pieces_match_the_whole_packet_arithmetic(dtype):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3000, generator=g), torch.randn(3000, generator=g)
    codec = DenseCodec(dtype)
    lay, got = streamed(x, dtype, 1000)
    summed, crc_in, crc_out = lay.new_packet(BufferPool()), lay.start_crc, lay.start_crc
    mean, crc_mean = torch.empty(3000), lay.start_crc
    for i, (a, b) in enumerate(lay.pieces):
        crc_in, crc_out = add_encode_piece(lay.piece(got, i), y[a:b], lay.piece(summed, i), lay.dtype, crc_in, crc_out)
    lay.check(got, crc_in)
    lay.seal(summed, crc_out)
    assert torch.equal(summed, codec.pack(y + codec.unpack(got)))
    for i, (a, b) in enumerate(lay.pieces):
        crc_mean = decode_piece(lay.piece(summed, i), mean[a:b], lay.dtype, 3.0, crc_mean)
    lay.check(summed, crc_mean)
    assert torch.equal(mean, codec.unpack(summed) / 3)


def test_check_refuses_a_corrupted_truncated_or_foreign_packet():
    x = torch.randn(500)
    lay, packet = streamed(x, "fp32", 400)

    def decoded_crc(p: torch.Tensor) -> int:
        crc, out = lay.start_crc, torch.empty(500)
        for i, (a, b) in enumerate(lay.pieces):
            crc = decode_piece(lay.piece(p, i), out[a:b], lay.dtype, 1.0, crc)
        return crc

    lay.check(packet, decoded_crc(packet))
    bad = packet.clone()
    bad[lay.header_bytes + 401] ^= 0x04                      # a payload bit flipped on the wire
    with pytest.raises(ValueError, match="checksum mismatch"):
        lay.check(bad, decoded_crc(bad))
    with pytest.raises(ValueError, match="truncated|length mismatch"):
        lay.check(packet[:-4], decoded_crc(packet))
    other = packet.clone()
    other[7] = 1                                             # source dtype fp16, resealed: valid, not expected
    lay.seal(other, 0)
    lay.seal(other, _C.crc32c(other.numpy()))
    with pytest.raises(ValueError, match="another tensor than this ring hop expects"):
        lay.check(other, decoded_crc(other))
    with pytest.raises(ValueError, match="bad magic"):
        lay.check(torch.zeros_like(packet), decoded_crc(packet))


def test_piece_kernels_refuse_mismatched_or_readonly_buffers():
    x = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="holds 39 bytes, not 10 values"):
        _C.encode_piece(x, np.zeros(39, np.uint8), 0, 0)
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        _C.encode_piece(x, np.zeros(80, np.uint8)[::2], 0, 0)
    ro = np.zeros(40, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _C.encode_piece(x, ro, 0, 0)
    with pytest.raises(ValueError, match="holds 20 bytes, not 10 values"):
        _C.add_encode_piece(np.zeros(20, np.uint8), x, np.zeros(40, np.uint8), 0, 0, 0)
    with pytest.raises(ValueError, match="float32"):
        _C.decode_piece(np.zeros(40, np.uint8), np.zeros(10, np.float64), 0, 1.0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.dense_header([10], 0, 7)


def test_piece_kernels_are_counted_as_compute():
    x = torch.randn(1000)
    lay = DenseLayout(1000, 0)
    packet = lay.new_packet(BufferPool())
    assert count_work(lambda: encode_piece(x, lay.piece(packet, 0), 0, 0)) == Work(0.0, 8000, 1)
    assert count_work(lambda: add_encode_piece(lay.piece(packet, 0), x, lay.piece(packet, 0), 0, 0, 0)
                      ) == Work(0.0, 12000, 1)


@pytest.mark.parametrize("n,piece_bytes,messages", [(1000, 400, 11), (1000, 1 << 20, 1), (0, 400, 1)])
def test_arrivals_wait_for_every_message_once_in_wire_order(n, piece_bytes, messages):
    class Receive:
        def __init__(self, log, i):
            self.log, self.i = log, i

        def wait(self):
            self.log.append(self.i)

    lay = DenseLayout(n, 0, piece_bytes)
    packet = lay.new_packet(BufferPool())
    assert len(lay.messages(packet)) == messages
    last = lay.last_message(packet)   # the header of a streamed packet, else the whole packet
    assert last.data_ptr() == lay.messages(packet)[-1].data_ptr() and last.numel() == lay.messages(packet)[-1].numel()
    assert last.numel() == (lay.header_bytes if lay.streamed else lay.nbytes)
    log: list[int] = []
    seen = []
    for i in lay.arrivals([Receive(log, m) for m in range(messages)]):
        seen.append((i, list(log)))
    assert log == list(range(messages))                      # each once, in order
    assert [i for i, _ in seen] == list(range(len(lay.pieces)))
    if lay.streamed:
        assert all(waited == list(range(i + 1)) for i, waited in seen)   # piece i only needs message i


def test_buffer_pool_reuses_buffers_and_holds_at_most_its_cap():
    pool = BufferPool(max_bytes=1000)
    a, b = pool.take(400), pool.take(400)
    pool.give([a, b])
    assert pool.held_bytes == 800
    assert pool.take(400) is b and pool.take(400) is a and pool.held_bytes == 0   # reused, not reallocated
    big = pool.take(2000)
    pool.give([a, big])                     # the big one would pass the cap: dropped, freed
    assert pool.held_bytes == 400 and pool.take(2000) is not big
