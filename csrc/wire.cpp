#include "wire.hpp"

#include <array>
#include <atomic>
#include <cstdlib>

#include <sys/mman.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace pysim {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "pysim's wire format assumes a little-endian host");

size_t dtype_bytes(DType d) { return d == DType::F32 ? 4 : 2; }

DType dtype_from_int(int v) {
  if (v < 0 || v > 2) fail("unknown dtype code " + std::to_string(v) + " (0=fp32, 1=fp16, 2=bf16)");
  return static_cast<DType>(v);
}

namespace {
std::atomic<size_t> g_held{0}, g_peak{0};
}  // namespace

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeFrom = 2 * kHugePage;

void* buffer_alloc(size_t bytes) {
  void* p;
  if (bytes >= kHugeFrom) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = std::aligned_alloc(kHugePage, rounded);
#if defined(MADV_HUGEPAGE)
    if (p) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
  } else {
    p = std::malloc(bytes ? bytes : 1);
  }
  if (!p) throw std::bad_alloc();
  const size_t now = g_held.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  size_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {}
  return p;
}

void buffer_free(void* p, size_t bytes) noexcept {
  g_held.fetch_sub(bytes, std::memory_order_relaxed);
  std::free(p);
}
size_t peak_buffer_bytes(bool reset) {
  const size_t peak = g_peak.load(std::memory_order_relaxed);
  if (reset) g_peak.store(g_held.load(std::memory_order_relaxed), std::memory_order_relaxed);
  return peak;
}

const char* codec_name(Codec c) {
  static const char* names[kNumCodecs] = {"dense", "topk", "randomk", "lowrank", "int8", "int4", "topk2"};
  return names[static_cast<int>(c)];
}

Codec codec_from_int(int v) {
  if (v < 0 || v >= kNumCodecs) fail("unknown codec id " + std::to_string(v));
  return static_cast<Codec>(v);
}

size_t codec_param_bytes(Codec c) {
  switch (c) {
    case Codec::Dense: return 0;
    case Codec::TopK: return 8;
    case Codec::RandomK: return 16;
    case Codec::LowRank: return 8;
    case Codec::Int8:
    case Codec::Int4:
    case Codec::TopK2: return 12;
  }
  fail("unknown codec id " + std::to_string(static_cast<int>(c)));
}

uint64_t checked_numel(const std::vector<uint32_t>& shape) {
  if (shape.size() > static_cast<size_t>(kMaxDims))
    fail("tensor has " + std::to_string(shape.size()) + " dimensions; packets hold at most 8");
  uint64_t n = 1;
  for (uint32_t d : shape) {
    n = checked_mul(n, d, "tensor shape");
    if (n > kMaxNumel) fail("tensor too large for a packet (more than 2^40 elements)");
  }
  return n;
}

namespace {

template <typename T>
void put(uint8_t* p, T v) { std::memcpy(p, &v, sizeof(T)); }
template <typename T>
T get(const uint8_t* p) { T v; std::memcpy(&v, p, sizeof(T)); return v; }

std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int b = 0; b < 8; ++b) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    t[i] = c;
  }
  return t;
}
const std::array<uint32_t, 256> kTable = make_table();

uint32_t crc32c_sw(const uint8_t* p, size_t n, uint32_t c) {
  for (size_t i = 0; i < n; ++i) c = kTable[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c;
}

// The CRC register after n zero bytes, from register c: a linear map of c, kept as one table per
// byte of c so that it costs four lookups. Used to join CRCs of adjacent blocks computed at once.
constexpr size_t kBlock = 2048;      // bytes per stream of the three-way loop below
constexpr size_t kSmallBlock = 256;  // the same for what is left (a many-node ring's packets are 1-6 KiB)

struct ZeroShift {
  std::array<std::array<uint32_t, 256>, 4> t{};
  explicit ZeroShift(size_t n) {
    std::array<uint32_t, 32> bit{};  // the map of each single bit of the register
    for (int b = 0; b < 32; ++b) {
      uint32_t c = 1u << b;
      for (size_t i = 0; i < n; ++i) c = kTable[c & 0xFF] ^ (c >> 8);
      bit[b] = c;
    }
    for (int k = 0; k < 4; ++k)
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t c = 0;
        for (int b = 0; b < 8; ++b)
          if (v & (1u << b)) c ^= bit[8 * k + b];
        t[k][v] = c;
      }
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};
const ZeroShift kShiftBlock(kBlock);
const ZeroShift kShiftSmallBlock(kSmallBlock);

#if defined(__x86_64__)
// crc32 has a latency of 3 cycles and a throughput of 1: one dependent chain runs at a third of
// the instruction's rate. Three blocks are checksummed at once from register 0 (the second and
// third) and joined: crc(A B C) = shift(shift(crc(A)) ^ crc(B)) ^ crc(C), the CRC being linear;
// 2 KiB blocks while 6 KiB are left, then 256-byte ones, then one chain for the last 767 bytes at most.
template <size_t Block>
__attribute__((target("sse4.2"))) inline uint64_t crc32c_three_blocks(const uint8_t* q, uint64_t c64,
                                                                       const ZeroShift& shift) {
  uint64_t a = c64, b = 0, d = 0;
  for (size_t j = 0; j < Block; j += 8) {
    a = _mm_crc32_u64(a, get<uint64_t>(q + j));
    b = _mm_crc32_u64(b, get<uint64_t>(q + Block + j));
    d = _mm_crc32_u64(d, get<uint64_t>(q + 2 * Block + j));
  }
  return shift(shift(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(d);
}

__attribute__((target("sse4.2"))) uint32_t crc32c_hw(const uint8_t* p, size_t n, uint32_t c) {
  uint64_t c64 = c;
  size_t i = 0;
  for (; i + 3 * kBlock <= n; i += 3 * kBlock) c64 = crc32c_three_blocks<kBlock>(p + i, c64, kShiftBlock);
  for (; i + 3 * kSmallBlock <= n; i += 3 * kSmallBlock)
    c64 = crc32c_three_blocks<kSmallBlock>(p + i, c64, kShiftSmallBlock);
  for (; i + 8 <= n; i += 8) c64 = _mm_crc32_u64(c64, get<uint64_t>(p + i));
  uint32_t c32 = static_cast<uint32_t>(c64);
  for (; i < n; ++i) c32 = _mm_crc32_u8(c32, p[i]);
  return c32;
}
const bool kHaveSse42 = __builtin_cpu_supports("sse4.2");
#endif

}  // namespace

uint32_t crc32c(const uint8_t* data, size_t len, uint32_t crc) {
  crc = ~crc;
#if defined(__x86_64__)
  crc = kHaveSse42 ? crc32c_hw(data, len, crc) : crc32c_sw(data, len, crc);
#else
  crc = crc32c_sw(data, len, crc);
#endif
  return ~crc;
}

static uint32_t packet_crc(const uint8_t* p, size_t len) {
  const uint8_t zeros[4] = {0, 0, 0, 0};
  uint32_t c = crc32c(p, 12);
  c = crc32c(zeros, 4, c);
  return crc32c(p + 16, len - 16, c);
}

void write_header(Header& h, uint8_t* p) {
  h.numel = checked_numel(h.shape);
  h.header_bytes = header_bytes(h.codec, h.shape.size());
  std::memset(p, 0, h.header_bytes);
  put<uint32_t>(p, kMagic);
  p[4] = kVersion;
  p[5] = static_cast<uint8_t>(h.codec);
  p[6] = static_cast<uint8_t>(h.value_dtype);
  p[7] = static_cast<uint8_t>(h.source_dtype);
  p[8] = static_cast<uint8_t>(h.shape.size());
  p[9] = h.flags;
  put<uint64_t>(p + 16, h.payload_bytes);
  size_t o = kBaseHeaderBytes;
  for (uint32_t d : h.shape) { put<uint32_t>(p + o, d); o += 4; }
  switch (h.codec) {
    case Codec::Dense: break;
    case Codec::TopK: put<uint64_t>(p + o, h.k); break;
    case Codec::RandomK: put<uint64_t>(p + o, h.seed); put<uint64_t>(p + o + 8, h.k); break;
    case Codec::LowRank: put<uint32_t>(p + o, h.rows); put<uint32_t>(p + o + 4, h.rank); break;
    case Codec::Int8:
    case Codec::Int4: put<uint64_t>(p + o, h.seed); put<uint32_t>(p + o + 8, h.block); break;
    case Codec::TopK2: put<uint64_t>(p + o, h.k); put<uint32_t>(p + o + 8, h.block); break;
  }
}

Bytes start_packet(Header& h) {
  Bytes out(checked_add(header_bytes(h.codec, h.shape.size()), h.payload_bytes, "packet length"));
  write_header(h, out.data());
  return out;
}

void put_checksum(uint8_t* packet, uint32_t crc) { put<uint32_t>(packet + 12, crc); }
uint32_t stored_checksum(const uint8_t* packet) { return get<uint32_t>(packet + 12); }

void seal(Bytes& packet) { put_checksum(packet.data(), packet_crc(packet.data(), packet.size())); }

// Checks the fields every reader needs before trusting the header's length.
static void check_frame(const uint8_t* p, size_t len) {
  if (len < kBaseHeaderBytes)
    fail("packet truncated: " + std::to_string(len) + " bytes is shorter than the 24-byte header");
  if (get<uint32_t>(p) != kMagic) fail("not a pysim packet (bad magic bytes)");
  if (p[4] != kVersion)
    fail("packet has wire-format version " + std::to_string(p[4]) + ", this build reads version " +
         std::to_string(kVersion));
  if (p[5] >= kNumCodecs) fail("packet has unknown codec id " + std::to_string(p[5]));
  if (p[8] > kMaxDims) fail("packet claims " + std::to_string(p[8]) + " dimensions (at most 8)");
}

uint64_t announced_length(const uint8_t* p, size_t len) {
  check_frame(p, len);
  return checked_add(header_bytes(static_cast<Codec>(p[5]), p[8]), get<uint64_t>(p + 16), "packet length");
}

Header parse_packet(const uint8_t* p, size_t len) {
  check_frame(p, len);
  if (p[6] > 2 || p[7] > 2) fail("packet has an unknown dtype code");
  if (p[10] != 0 || p[11] != 0) fail("packet has non-zero reserved bytes");
  Header h;
  h.codec = static_cast<Codec>(p[5]);
  h.value_dtype = static_cast<DType>(p[6]);
  h.source_dtype = static_cast<DType>(p[7]);
  h.flags = p[9];
  const size_t ndim = p[8];
  h.header_bytes = header_bytes(h.codec, ndim);
  if (len < h.header_bytes)
    fail("packet truncated: " + std::to_string(len) + " bytes is shorter than its " +
         std::to_string(h.header_bytes) + "-byte header");
  h.payload_bytes = get<uint64_t>(p + 16);
  if (h.payload_bytes != len - h.header_bytes)
    fail("packet length mismatch: header announces " + std::to_string(h.payload_bytes) +
         " payload bytes, buffer holds " + std::to_string(len - h.header_bytes) + " (truncated or padded)");
  if (get<uint32_t>(p + 12) != packet_crc(p, len)) fail("packet checksum mismatch (corrupted in transit)");
  size_t o = kBaseHeaderBytes;
  h.shape.resize(ndim);
  for (size_t i = 0; i < ndim; ++i, o += 4) h.shape[i] = get<uint32_t>(p + o);
  h.numel = checked_numel(h.shape);
  switch (h.codec) {
    case Codec::Dense: break;
    case Codec::TopK: h.k = get<uint64_t>(p + o); break;
    case Codec::RandomK: h.seed = get<uint64_t>(p + o); h.k = get<uint64_t>(p + o + 8); break;
    case Codec::LowRank: h.rows = get<uint32_t>(p + o); h.rank = get<uint32_t>(p + o + 4); break;
    case Codec::Int8:
    case Codec::Int4: h.seed = get<uint64_t>(p + o); h.block = get<uint32_t>(p + o + 8); break;
    case Codec::TopK2: h.k = get<uint64_t>(p + o); h.block = get<uint32_t>(p + o + 8); break;
  }
  return h;
}

}  // namespace pysim
