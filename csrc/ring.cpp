#include "ring.hpp"

#include <algorithm>
#include <map>
#include <string>

#include "pieces.hpp"

namespace pysim {

size_t dense_packet_bytes(size_t n, DType d) {
  return header_bytes(Codec::Dense, 1) + checked_mul(n, dtype_bytes(d), "dense packet");
}

namespace {

// The header (checksum field zero) of a 1-D dense chunk of n values and the CRC over it,
// made once per chunk size of a call.
struct ChunkHeader {
  Bytes bytes;
  uint32_t crc;
};

const ChunkHeader& header_for(std::map<size_t, ChunkHeader>& cache, size_t n, DType d) {
  auto it = cache.find(n);
  if (it == cache.end()) {
    if (n > UINT32_MAX) fail("ring chunk too large for a packet dimension");
    Bytes h = dense_header({static_cast<uint32_t>(n)}, DType::F32, d);
    const uint32_t crc = crc32c(h.data(), h.size());
    it = cache.emplace(n, ChunkHeader{std::move(h), crc}).first;
  }
  return it->second;
}

void check_ranges(size_t arena_len, size_t members, size_t size, DType d, const RingHop* hops, size_t nhops) {
  for (size_t i = 0; i < nhops; ++i) {
    const RingHop& h = hops[i];
    auto bad = [i](const char* what) { fail("ring hop " + std::to_string(i) + ": " + what); };  // built on failure only
    if (h.mode < 1 || h.mode > 3) bad(("unknown mode " + std::to_string(h.mode)).c_str());
    if (h.row < 0 || static_cast<size_t>(h.row) >= members) bad("member row out of range");
    if (h.a < 0 || h.b < h.a || static_cast<size_t>(h.b) > size) bad("chunk out of range");
    if (h.divisor < 1) bad("ring size must be >= 1");
    const size_t len = dense_packet_bytes(static_cast<size_t>(h.b - h.a), d);
    if (h.in_off < 0 || static_cast<size_t>(h.in_off) > arena_len || arena_len - h.in_off < len)
      bad("incoming packet outside the arena");
    if (h.mode != static_cast<int64_t>(HopMode::Gather) &&
        (h.out_off < 0 || static_cast<size_t>(h.out_off) > arena_len || arena_len - h.out_off < len))
      bad("outgoing packet outside the arena");
  }
}

// Asks the caches for the start of hop h's data (its member's values, its packets, its
// result): the hops of a batch jump between members whose rows lie megabytes apart, so each
// hop would otherwise begin with misses the hardware prefetcher cannot foresee. A hint: no
// effect on what is computed.
void prefetch_hop(const RingHop& h, const uint8_t* arena, const std::vector<const float*>& xs,
                  const std::vector<float*>& rs, DType d) {
  constexpr size_t kLine = 64, kMaxBytes = 512;
  const size_t bytes = std::min(kMaxBytes, static_cast<size_t>(h.b - h.a) * sizeof(float));
  const size_t packet = std::min(kMaxBytes, static_cast<size_t>(h.b - h.a) * dtype_bytes(d) + kBaseHeaderBytes);
  const auto* x = reinterpret_cast<const uint8_t*>(xs[h.row] + h.a);
  const auto* r = reinterpret_cast<const uint8_t*>(rs[h.row] + h.a);
  for (size_t k = 0; k < packet; k += kLine) __builtin_prefetch(arena + h.in_off + k, 0);
  if (h.mode == static_cast<int64_t>(HopMode::Gather)) {
    for (size_t k = 0; k < bytes; k += kLine) __builtin_prefetch(r + k, 1);
    return;
  }
  for (size_t k = 0; k < bytes; k += kLine) __builtin_prefetch(x + k, 0);
  for (size_t k = 0; k < packet; k += kLine) __builtin_prefetch(arena + h.out_off + k, 1);
  if (h.mode == static_cast<int64_t>(HopMode::ReduceOwn))
    for (size_t k = 0; k < bytes; k += kLine) __builtin_prefetch(r + k, 1);
}

}  // namespace

void ring_hops(uint8_t* arena, size_t arena_len, const std::vector<const float*>& xs, const std::vector<float*>& rs,
               size_t size, DType d, const RingHop* hops, size_t nhops) {
  if (xs.size() != rs.size()) fail("ring hops need one result per input");
  check_ranges(arena_len, xs.size(), size, d, hops, nhops);
  std::map<size_t, ChunkHeader> headers;
  for (size_t i = 0; i < nhops; ++i) {
    const RingHop& h = hops[i];
    if (i + 1 < nhops) prefetch_hop(hops[i + 1], arena, xs, rs, d);   // ranges checked above
    const size_t n = static_cast<size_t>(h.b - h.a);
    const ChunkHeader& head = header_for(headers, n, d);
    const size_t hlen = head.bytes.size(), len = hlen + n * dtype_bytes(d);
    const uint8_t* in = arena + h.in_off;
    float* r = rs[h.row] + h.a;
    const float divisor = static_cast<float>(h.divisor);
    if (h.mode == static_cast<int64_t>(HopMode::Gather)) {
      const uint32_t crc = decode_piece(in + hlen, n, d, divisor, r, head.crc);
      check_streamed(in, len, head.bytes.data(), hlen, crc);
      continue;
    }
    uint8_t* out = arena + h.out_off;
    std::memcpy(out, head.bytes.data(), hlen);
    auto [crc_in, crc_out] = add_encode_piece(in + hlen, xs[h.row] + h.a, n, d, out + hlen, head.crc, head.crc);
    check_streamed(in, len, head.bytes.data(), hlen, crc_in);
    put_checksum(out, crc_out);
    if (h.mode == static_cast<int64_t>(HopMode::ReduceOwn)) decode_piece(out + hlen, n, d, divisor, r, 0);
  }
}

}  // namespace pysim
