#include "pieces.hpp"

#include <algorithm>
#include <cstring>

#include "codecs.hpp"
#include "convert.hpp"

namespace pysim {
namespace {

constexpr size_t kBlock = 2048;  // values per pass through the L1-sized scratch buffer

}  // namespace

Bytes dense_header(const std::vector<uint32_t>& shape, DType source_dtype, DType value_dtype) {
  if (shape.size() > static_cast<size_t>(kMaxDims)) fail("packets hold at most 8 dimensions");
  Header h;
  h.codec = Codec::Dense;
  h.value_dtype = value_dtype;
  h.source_dtype = source_dtype;
  h.shape = shape;
  h.payload_bytes = dense_payload_bytes(checked_numel(shape), value_dtype);
  Bytes out(header_bytes(Codec::Dense, shape.size()));
  write_header(h, out.data());
  return out;
}

uint32_t encode_piece(const float* x, size_t n, DType d, uint8_t* out, uint32_t crc) {
  encode_values(x, n, d, out);
  return crc32c(out, n * dtype_bytes(d), crc);
}

std::pair<uint32_t, uint32_t> add_encode_piece(const uint8_t* got, const float* x, size_t n, DType d,
                                               uint8_t* out, uint32_t crc_got, uint32_t crc_out) {
  const size_t w = dtype_bytes(d);
  float sum[kBlock];
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t m = std::min(kBlock, n - b);
    crc_got = crc32c(got + w * b, w * m, crc_got);
    decode_values(got + w * b, m, d, sum);
    for (size_t i = 0; i < m; ++i) sum[i] += x[b + i];
    encode_values(sum, m, d, out + w * b);
    crc_out = crc32c(out + w * b, w * m, crc_out);
  }
  return {crc_got, crc_out};
}

uint32_t decode_piece(const uint8_t* got, size_t n, DType d, float divisor, float* out, uint32_t crc) {
  const size_t w = dtype_bytes(d);
  crc = crc32c(got, w * n, crc);
  decode_values(got, n, d, out);
  for (size_t i = 0; i < n; ++i) out[i] /= divisor;
  return crc;
}

void check_streamed(const uint8_t* packet, size_t len, const uint8_t* expected, size_t hlen, uint32_t crc) {
  const bool same_header = len >= hlen && hlen >= kBaseHeaderBytes && len == announced_length(expected, hlen) &&
                           std::memcmp(packet, expected, 12) == 0 &&
                           std::memcmp(packet + 16, expected + 16, hlen - 16) == 0;
  if (same_header && stored_checksum(packet) == crc) return;
  // name what is wrong as unpack would: the full parser checks every field and the checksum
  Limits any;
  any.max_numel = kMaxNumel;
  read_packet(packet, len, any);
  if (!same_header) fail("packet holds another tensor than this ring hop expects (its header differs)");
  fail("packet checksum mismatch (corrupted in transit)");
}

}  // namespace pysim
