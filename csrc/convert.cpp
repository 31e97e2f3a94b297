#include "convert.hpp"

#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallel.hpp"

namespace pysim {
namespace {

inline uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t f32_to_f16_scalar(float f) {
  uint32_t u = bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow (after rounding) -> inf
  if (a < 0x38800000u) {  // subnormal or zero in half
    float r = from_bits(a) + 0.5f;  // align so the half subnormal bits land in the low mantissa
    return static_cast<uint16_t>(sign | ((bits(r) - 0x3f000000u) & 0xffffu));
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (a >> 13));
}

inline float f16_to_f32_scalar(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  if (e == 0) {
    float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // 2^-24
    return from_bits(bits(v) | sign);
  }
  if (e == 31) return from_bits(sign | 0x7f800000u | (m << 13));
  return from_bits(sign | ((e + 112) << 23) | (m << 13));
}

#if defined(__x86_64__)
const bool kHaveF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");

__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* x, size_t n, uint8_t* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), h);
  }
  for (; i < n; ++i) { uint16_t h = f32_to_f16_scalar(x[i]); std::memcpy(out + 2 * i, &h, 2); }
}

__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const uint8_t* in, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i))));
  for (; i < n; ++i) { uint16_t h; std::memcpy(&h, in + 2 * i, 2); out[i] = f16_to_f32_scalar(h); }
}
#endif

void encode_range(const float* x, size_t n, DType d, uint8_t* out) {
  switch (d) {
    case DType::F32: std::memcpy(out, x, 4 * n); return;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) { uint16_t h = f32_to_bf16(x[i]); std::memcpy(out + 2 * i, &h, 2); }
      return;
    case DType::F16:
#if defined(__x86_64__)
      if (kHaveF16c) { f32_to_f16_f16c(x, n, out); return; }
#endif
      for (size_t i = 0; i < n; ++i) { uint16_t h = f32_to_f16_scalar(x[i]); std::memcpy(out + 2 * i, &h, 2); }
      return;
  }
}

void decode_range(const uint8_t* in, size_t n, DType d, float* out) {
  switch (d) {
    case DType::F32: std::memcpy(out, in, 4 * n); return;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h; std::memcpy(&h, in + 2 * i, 2);
        out[i] = from_bits(static_cast<uint32_t>(h) << 16);
      }
      return;
    case DType::F16:
#if defined(__x86_64__)
      if (kHaveF16c) { f16_to_f32_f16c(in, n, out); return; }
#endif
      for (size_t i = 0; i < n; ++i) { uint16_t h; std::memcpy(&h, in + 2 * i, 2); out[i] = f16_to_f32_scalar(h); }
      return;
  }
}

constexpr size_t kParallelMin = 1 << 20;

}  // namespace

void encode_values(const float* x, size_t n, DType d, uint8_t* out) {
  const size_t w = dtype_bytes(d);
  parallel_for(n, kParallelMin, [&](size_t, size_t b, size_t e) { encode_range(x + b, e - b, d, out + w * b); });
}

void decode_values(const uint8_t* in, size_t n, DType d, float* out) {
  const size_t w = dtype_bytes(d);
  parallel_for(n, kParallelMin, [&](size_t, size_t b, size_t e) { decode_range(in + w * b, e - b, d, out + b); });
}

}  // namespace pysim
