#include "quant.hpp"

#include <algorithm>
#include <cstring>

#include "parallel.hpp"

namespace pysim {
namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr size_t kChunk = 256;              // int4 values are built this many at a time
constexpr size_t kParallelMin = 1 << 18;    // elements per thread before threads pay off

inline uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int qmax(Codec c) { return c == Codec::Int8 ? 127 : 7; }

// The smallest bfloat16 >= s, for finite s >= 0.
inline uint16_t bf16_round_up(float s) {
  const uint32_t u = bits(s);
  return static_cast<uint16_t>((u >> 16) + ((u & 0xffffu) != 0));
}
inline float bf16_value(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

// A 32-bit integer hash (xorshift-multiply rounds); two rounds keyed by the seed.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct Dither {  // u(i) in [0, 1) for element i, from the packet seed
  uint32_t k0, k1;
  explicit Dither(uint64_t seed)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32) ^ 0x9e3779b9u) {}
  float operator()(uint32_t i) const {
    return static_cast<float>(mix32(mix32(i ^ k0) + k1) >> 8) * (1.0f / 16777216.0f);
  }
};

// The block's scale, and x * pre * inv = x / scale with pre and inv exact
// powers of two apart so that inv stays finite for subnormal scales.
struct Scale {
  uint16_t wire;
  float pre, inv;
};

Scale block_scale(const float* x, size_t len, int Q) {
  uint32_t amax = 0;
  for (size_t l = 0; l < len; ++l) amax = std::max(amax, bits(x[l]) & kAbsMask);
  if (amax >= kInfBits) fail("quantised codecs need finite input; the tensor holds NaN or inf");
  Scale s;
  s.wire = bf16_round_up(from_bits(amax) / static_cast<float>(Q));
  const float scale = bf16_value(s.wire);
  s.pre = scale < 1e-30f ? 0x1p64f : 1.0f;
  s.inv = scale == 0.0f ? 0.0f : 1.0f / (scale * s.pre);
  return s;
}

// q[l] = x[l] / scale rounded to an integer in [-Q, Q].
template <bool Stochastic>
void round_chunk(const float* x, size_t len, uint32_t first, const Scale& s, int Q, const Dither& dither, int8_t* q) {
  for (size_t l = 0; l < len; ++l) {
    const float v = x[l] * s.pre * s.inv;
    int r;
    if constexpr (Stochastic) {
      // floor(v + u) via truncation of a positive number (v >= -Q > -128).
      r = static_cast<int>(v + dither(first + static_cast<uint32_t>(l)) + 128.0f) - 128;
    } else {
      // Adding and subtracting 1.5 * 2^23 rounds to nearest even for |v| < 2^22.
      r = static_cast<int>((v + 12582912.0f) - 12582912.0f);
    }
    q[l] = static_cast<int8_t>(std::min(std::max(r, -Q), Q));
  }
}

template <bool Stochastic>
void quantize_blocks(const float* x, uint64_t n, Codec c, uint32_t block, const Dither& dither, size_t b, size_t e,
                     uint8_t* scales, uint8_t* vals) {
  const int Q = qmax(c);
  int8_t tmp[kChunk];
  for (size_t blk = b; blk < e; ++blk) {
    const uint64_t i0 = blk * block, len = std::min<uint64_t>(block, n - i0);
    const Scale s = block_scale(x + i0, len, Q);
    std::memcpy(scales + 2 * blk, &s.wire, 2);
    if (c == Codec::Int8) {
      round_chunk<Stochastic>(x + i0, len, static_cast<uint32_t>(i0), s, Q, dither,
                              reinterpret_cast<int8_t*>(vals + i0));
      continue;
    }
    uint8_t* out = vals + i0 / 2;  // block is even, so every block starts on a byte
    for (uint64_t c0 = 0; c0 < len; c0 += kChunk) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(kChunk, len - c0));
      round_chunk<Stochastic>(x + i0 + c0, m, static_cast<uint32_t>(i0 + c0), s, Q, dither, tmp);
      if (m & 1) tmp[m] = 0;  // only the tensor's last element can be unpaired
      for (size_t j = 0; j < (m + 1) / 2; ++j)
        out[c0 / 2 + j] = static_cast<uint8_t>((tmp[2 * j] & 0x0f) | (static_cast<uint8_t>(tmp[2 * j + 1]) << 4));
    }
  }
}

}  // namespace

void check_quant_block(Codec c, uint64_t block) {
  if (c != Codec::Int8 && c != Codec::Int4) fail("not a quantised codec");
  if (block < 2 || block > kMaxQuantBlock || block % 2)
    fail("quantisation block size must be even and in [2, 2^24], got " + std::to_string(block));
}

uint64_t quant_payload_bytes(uint64_t numel, Codec c, uint64_t block) {
  check_quant_block(c, block);
  const uint64_t blocks = numel / block + (numel % block != 0);
  const uint64_t values = c == Codec::Int8 ? numel : numel / 2 + (numel & 1);
  return checked_add(checked_mul(blocks, 2, "quantised payload"), values, "quantised payload");
}

void quantize(const float* x, uint64_t n, Codec c, uint32_t block, bool stochastic, uint64_t seed, uint8_t* out) {
  check_quant_block(c, block);
  if (n > 0xffffffffull) fail("quantised codecs support tensors of fewer than 2^32 elements");
  const uint64_t blocks = (n + block - 1) / block;
  uint8_t* vals = out + 2 * blocks;
  const Dither dither(seed);
  parallel_for(blocks, std::max<size_t>(1, kParallelMin / block), [&](size_t, size_t b, size_t e) {
    if (stochastic) quantize_blocks<true>(x, n, c, block, dither, b, e, out, vals);
    else quantize_blocks<false>(x, n, c, block, dither, b, e, out, vals);
  });
}

void dequantize(const uint8_t* in, uint64_t n, Codec c, uint32_t block, float* out) {
  check_quant_block(c, block);
  const uint64_t blocks = (n + block - 1) / block;
  const uint8_t* vals = in + 2 * blocks;
  parallel_for(blocks, std::max<size_t>(1, kParallelMin / block), [&](size_t, size_t b, size_t e) {
    for (size_t blk = b; blk < e; ++blk) {
      uint16_t wire;
      std::memcpy(&wire, in + 2 * blk, 2);
      if (wire >= 0x7f80u) fail("quantised packet corrupted: a scale is negative, NaN or inf");
      const float s = bf16_value(wire);
      const uint64_t i0 = blk * block, len = std::min<uint64_t>(block, n - i0);
      int bad = 0;
      if (c == Codec::Int8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(vals + i0);
        for (uint64_t l = 0; l < len; ++l) {
          bad |= q[l] == -128;
          out[i0 + l] = static_cast<float>(q[l]) * s;
        }
      } else {
        const uint8_t* q = vals + i0 / 2;
        const uint64_t pairs = len / 2;
        for (uint64_t j = 0; j < pairs; ++j) {
          const int lo = static_cast<int8_t>(static_cast<uint8_t>(q[j] << 4)) >> 4;
          const int hi = static_cast<int8_t>(q[j]) >> 4;
          bad |= (lo == -8) | (hi == -8);
          out[i0 + 2 * j] = static_cast<float>(lo) * s;
          out[i0 + 2 * j + 1] = static_cast<float>(hi) * s;
        }
        if (len & 1) {
          const int lo = static_cast<int8_t>(static_cast<uint8_t>(q[pairs] << 4)) >> 4;
          bad |= (lo == -8) | ((q[pairs] >> 4) != 0);
          out[i0 + len - 1] = static_cast<float>(lo) * s;
        }
      }
      if (bad) fail("quantised packet corrupted: a value is outside [-Q, Q] or a padding nibble is set");
    }
  });
}

}  // namespace pysim
