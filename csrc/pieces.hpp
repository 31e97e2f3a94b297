// Dense packets written and read piece by piece, so that a ring all-reduce hop
// puts piece i on the wire while it encodes piece i+1, and reduces piece i
// while piece i+1 is still arriving.
//
// The bytes are exactly those of pack_dense: a piece is a range of the
// payload. The header's CRC-32C is chained over the header (checksum field
// zero) and then the pieces in payload order, so a streamed packet's header
// is sealed, and travels, last. The receiver chains the CRC over the pieces
// as it decodes them and checks the whole packet with check_streamed before
// it trusts the result.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "wire.hpp"

namespace pysim {

// The header of a dense packet holding `shape`, checksum field zero.
Bytes dense_header(const std::vector<uint32_t>& shape, DType source_dtype, DType value_dtype);

// out (n * dtype_bytes(d) bytes) = x (n floats) encoded; returns crc continued over out.
uint32_t encode_piece(const float* x, size_t n, DType d, uint8_t* out, uint32_t crc);

// out = encode(decode(got) + x) for n values, the sum in float32; returns the crcs
// continued over got and over out.
std::pair<uint32_t, uint32_t> add_encode_piece(const uint8_t* got, const float* x, size_t n, DType d,
                                               uint8_t* out, uint32_t crc_got, uint32_t crc_out);

// out = decode(got) / divisor for n values (float32 division); returns crc continued over got.
uint32_t decode_piece(const uint8_t* got, size_t n, DType d, float divisor, float* out, uint32_t crc);

// Checks a streamed packet (len bytes, header first) against the header its receiver
// expects (`expected`, hlen bytes, checksum field zero) and the CRC the receiver chained
// over the expected header and the payload: throws std::invalid_argument that says what
// is wrong (the same messages as unpack) unless the packet is exactly the expected one.
void check_streamed(const uint8_t* packet, size_t len, const uint8_t* expected, size_t hlen, uint32_t crc);

}  // namespace pysim
