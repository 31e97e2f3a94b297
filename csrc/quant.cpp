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
  bool finite;  // false: the block holds NaN or inf; it goes out as a NaN scale and zero values
};

constexpr uint16_t kNanScale = 0x7fc0u;  // the bfloat16 quiet NaN a non-finite block's scale is sent as

// The kernels below take the block length as a template argument L when it is
// one of the common sizes (0: the runtime `len`), so that the compiler sees a
// fixed trip count and vectorises each block without a scalar remainder.
#define PYSIM_INLINE inline __attribute__((always_inline))

template <size_t L>
PYSIM_INLINE Scale block_scale(const float* __restrict x, size_t len, int Q) {
  if constexpr (L != 0) len = L;
  uint32_t amax = 0;
  for (size_t l = 0; l < len; ++l) amax = std::max(amax, bits(x[l]) & kAbsMask);
  Scale s;
  if (amax >= kInfBits) {  // NaN in, NaN out, as a real run would send it: the block decodes to NaN
    s.wire = kNanScale;
    s.pre = s.inv = 0.0f;
    s.finite = false;
    return s;
  }
  s.finite = true;
  s.wire = bf16_round_up(from_bits(amax) / static_cast<float>(Q));
  const float scale = bf16_value(s.wire);
  s.pre = scale < 1e-30f ? 0x1p64f : 1.0f;
  s.inv = scale == 0.0f ? 0.0f : 1.0f / (scale * s.pre);
  return s;
}

// q[l] = x[l] / scale rounded to an integer in [-Q, Q].
template <bool Stochastic, size_t L>
PYSIM_INLINE void round_values(const float* __restrict x, size_t len, uint32_t first, const Scale& s, int Q,
                               const Dither& dither, int8_t* __restrict q) {
  if constexpr (L != 0) len = L;
  const float pre = s.pre, inv = s.inv;
  for (size_t l = 0; l < len; ++l) {
    const float v = x[l] * pre * inv;
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

// Two's complement nibbles: out[j] = q[2j] | q[2j+1] << 4 (q[len] read as 0 when len is odd).
template <size_t L>
PYSIM_INLINE void pack_nibbles(int8_t* __restrict q, size_t len, uint8_t* __restrict out) {
  if constexpr (L != 0) len = L;
  if (len & 1) q[len] = 0;
  for (size_t j = 0; j < (len + 1) / 2; ++j)
    out[j] = static_cast<uint8_t>((q[2 * j] & 0x0f) | (static_cast<uint8_t>(q[2 * j + 1]) << 4));
}

template <bool Stochastic, size_t L>
PYSIM_INLINE void quantize_block(const float* __restrict x, size_t len, uint32_t first, Codec c,
                                 const Dither& dither, uint8_t* scale_out, uint8_t* __restrict vals) {
  const int Q = qmax(c);
  const Scale s = block_scale<L>(x, len, Q);
  std::memcpy(scale_out, &s.wire, 2);
  if constexpr (L != 0) len = L;
  if (!s.finite) {
    std::memset(vals, 0, c == Codec::Int8 ? len : (len + 1) / 2);
    return;
  }
  if (c == Codec::Int8) {
    round_values<Stochastic, L>(x, len, first, s, Q, dither, reinterpret_cast<int8_t*>(vals));
    return;
  }
  if constexpr (L != 0 && L <= kChunk) {
    int8_t tmp[L + 1];
    round_values<Stochastic, L>(x, L, first, s, Q, dither, tmp);
    pack_nibbles<L>(tmp, L, vals);
  } else {
    int8_t tmp[kChunk + 1];
    if constexpr (L != 0) len = L;
    for (size_t c0 = 0; c0 < len; c0 += kChunk) {
      const size_t m = std::min(kChunk, len - c0);
      round_values<Stochastic, 0>(x + c0, m, first + static_cast<uint32_t>(c0), s, Q, dither, tmp);
      pack_nibbles<0>(tmp, m, vals + c0 / 2);
    }
  }
}

template <bool Stochastic>
void quantize_blocks(const float* x, uint64_t n, Codec c, uint32_t block, const Dither& dither, size_t b, size_t e,
                     uint8_t* scales, uint8_t* vals) {
  const bool int8 = c == Codec::Int8;
  for (size_t blk = b; blk < e; ++blk) {
    const uint64_t i0 = blk * block, len = std::min<uint64_t>(block, n - i0);
    const uint32_t first = static_cast<uint32_t>(i0);
    uint8_t* out = vals + (int8 ? i0 : i0 / 2);  // block is even, so every int4 block starts on a byte
    switch (len) {
      case 32: quantize_block<Stochastic, 32>(x + i0, len, first, c, dither, scales + 2 * blk, out); break;
      case 64: quantize_block<Stochastic, 64>(x + i0, len, first, c, dither, scales + 2 * blk, out); break;
      case 128: quantize_block<Stochastic, 128>(x + i0, len, first, c, dither, scales + 2 * blk, out); break;
      case 256: quantize_block<Stochastic, 256>(x + i0, len, first, c, dither, scales + 2 * blk, out); break;
      default: quantize_block<Stochastic, 0>(x + i0, len, first, c, dither, scales + 2 * blk, out);
    }
  }
}

// Decodes one int8 block; returns non-zero if a value is -128.
template <size_t L>
PYSIM_INLINE int dequantize_int8_block(const int8_t* __restrict v, size_t len, float s, float* __restrict out) {
  if constexpr (L != 0) len = L;
  int bad = 0;
  for (size_t l = 0; l < len; ++l) {
    bad |= v[l] == -128;
    out[l] = static_cast<float>(v[l]) * s;
  }
  return bad;
}

inline float checked_scale(const uint8_t* scales, size_t blk) {
  uint16_t wire;
  std::memcpy(&wire, scales + 2 * blk, 2);
  if (wire >= 0x7f80u && wire != kNanScale) fail("quantised packet corrupted: a scale is negative, inf or a non-canonical NaN");
  return bf16_value(wire);
}

// Decodes int4 elements [i0, i1) (i0 even) in chunks that span several blocks:
// nibbles are sign-extended to bytes and scales spread per element first, so
// that the final multiply runs over long, fully vectorised loops.
int dequantize_int4_range(const uint8_t* scales, const uint8_t* vals, uint64_t i0, uint64_t i1, uint32_t block,
                          float* out) {
  constexpr size_t C = 1024;
  int8_t v[C];
  float sc[C];
  int bad = 0;
  for (uint64_t c0 = i0; c0 < i1; c0 += C) {
    const size_t m = static_cast<size_t>(std::min<uint64_t>(C, i1 - c0));
    const uint8_t* __restrict q = vals + c0 / 2;
    for (size_t j = 0; j < m / 2; ++j) {
      v[2 * j] = static_cast<int8_t>(static_cast<int8_t>(static_cast<uint8_t>(q[j] << 4)) >> 4);
      v[2 * j + 1] = static_cast<int8_t>(static_cast<int8_t>(q[j]) >> 4);
    }
    if (m & 1) {  // the tensor's last element: its high nibble is padding
      v[m - 1] = static_cast<int8_t>(static_cast<int8_t>(static_cast<uint8_t>(q[m / 2] << 4)) >> 4);
      bad |= (q[m / 2] >> 4) != 0;
    }
    for (size_t l = 0; l < m;) {
      const uint64_t blk = (c0 + l) / block;
      const size_t end = static_cast<size_t>(std::min<uint64_t>(m, (blk + 1) * block - c0));
      const float s = checked_scale(scales, blk);
      for (; l < end; ++l) sc[l] = s;
    }
    for (size_t l = 0; l < m; ++l) {
      bad |= v[l] == -8;
      out[c0 + l] = static_cast<float>(v[l]) * sc[l];
    }
  }
  return bad;
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
    int bad = 0;
    if (c == Codec::Int4) {
      bad = dequantize_int4_range(in, vals, b * block, std::min<uint64_t>(e * block, n), block, out);
    } else {
      for (size_t blk = b; blk < e; ++blk) {
        const float s = checked_scale(in, blk);
        const uint64_t i0 = blk * block, len = std::min<uint64_t>(block, n - i0);
        const int8_t* q = reinterpret_cast<const int8_t*>(vals + i0);
        switch (len) {
          case 32: bad |= dequantize_int8_block<32>(q, len, s, out + i0); break;
          case 64: bad |= dequantize_int8_block<64>(q, len, s, out + i0); break;
          case 128: bad |= dequantize_int8_block<128>(q, len, s, out + i0); break;
          case 256: bad |= dequantize_int8_block<256>(q, len, s, out + i0); break;
          default: bad |= dequantize_int8_block<0>(q, len, s, out + i0);
        }
      }
    }
    if (bad) fail("quantised packet corrupted: a value is outside [-Q, Q] or a padding nibble is set");
  });
}

// ---------------------------------------------------------------- two-bit values

void check_quant2_block(uint64_t block) {
  if (block < 4 || block > kMaxQuant2Block || block % 4 != 0)
    fail("2-bit block size must be a multiple of 4 in [4, 2^24], got " + std::to_string(block));
}

uint64_t quant2_payload_bytes(uint64_t n, uint64_t block) {
  check_quant2_block(block);
  const uint64_t blocks = n / block + (n % block != 0);
  return checked_add(checked_mul(blocks, 2, "2-bit payload"), n / 4 + (n % 4 != 0), "2-bit payload");
}

void quantize2(const float* x, uint64_t n, uint32_t block, uint8_t* out) {
  const uint64_t blocks = n / block + (n % block != 0);
  uint8_t* codes = out + 2 * blocks;
  std::memset(codes, 0, n / 4 + (n % 4 != 0));
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint64_t i0 = b * block, i1 = std::min<uint64_t>(n, i0 + block);
    uint32_t amax = 0;
    for (uint64_t i = i0; i < i1; ++i) amax = std::max(amax, bits(x[i]) & kAbsMask);
    const uint16_t wire = amax >= kInfBits ? kNanScale : bf16_round_up(from_bits(amax));
    std::memcpy(out + 2 * b, &wire, 2);
    if (amax >= kInfBits) continue;  // zero codes under a NaN scale
    const float s = bf16_value(wire), hi = s * (2.0f / 3.0f);
    for (uint64_t i = i0; i < i1; ++i) {  // thresholds between -s, -s/3, s/3, s: -2s/3, 0, 2s/3
      const float v = x[i];
      const uint32_t c = v < -hi ? 0u : v < 0.0f ? 1u : v < hi ? 2u : 3u;
      codes[i / 4] = static_cast<uint8_t>(codes[i / 4] | (c << (2 * (i % 4))));
    }
  }
}

void dequantize2(const uint8_t* in, uint64_t n, uint32_t block, float* out) {
  const uint64_t blocks = n / block + (n % block != 0);
  const uint8_t* codes = in + 2 * blocks;
  if (n % 4 != 0 && (codes[n / 4] >> (2 * (n % 4))) != 0)
    fail("2-bit packet corrupted: a padding bit of the last byte is set");
  static constexpr float kLevel[4] = {-1.0f, -1.0f / 3.0f, 1.0f / 3.0f, 1.0f};
  for (uint64_t b = 0; b < blocks; ++b) {
    const float s = checked_scale(in, b);
    const uint64_t i0 = b * block, i1 = std::min<uint64_t>(n, i0 + block);
    for (uint64_t i = i0; i < i1; ++i) out[i] = kLevel[(codes[i / 4] >> (2 * (i % 4))) & 3u] * s;
  }
}

}  // namespace pysim
