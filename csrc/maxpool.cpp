#include "maxpool.hpp"

#include <algorithm>
#include <cstring>

#include "parallel.hpp"

namespace pysim {

namespace {

inline uint32_t bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

inline float from_bits(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// The winner of two values in scan order, first then second, under torch's rule (the second
// replaces the first if it is greater or NaN), as masks rather than a branch: activations make a
// branch unpredictable (10 ns per window on random data). Returns the winner; *second is set to
// whether the second won.
inline float duel(float first, float second, uint32_t* second_won) {
  const uint32_t won = 0u - static_cast<uint32_t>((second > first) | (second != second));
  *second_won = won;
  return from_bits((bits(second) & won) | (bits(first) & ~won));
}

// Four lanes of the duel, in GCC/Clang vector extensions (SSE or NEON, no -march needed).
using f4 = float __attribute__((vector_size(16)));
using u4 = uint32_t __attribute__((vector_size(16)));

inline f4 load4(const float* p) {
  f4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f4 duel4(f4 first, f4 second, u4* second_won) {
  const u4 won = reinterpret_cast<u4>((second > first) | (second != second));   // lanes of all ones or zero
  *second_won = won;
  return reinterpret_cast<f4>((reinterpret_cast<u4>(second) & won) | (reinterpret_cast<u4>(first) & ~won));
}

// A window's scan (top-left, top-right, bottom-left, bottom-right) as a tournament: the top pair's
// winner, the bottom pair's, then the bottom one replaces the top one under the same rule. The same
// winner as the scan: the first maximum, or the last NaN (a window of -inf: its first element).
// Four windows at a time, the rest one by one.
void maxpool_planes(const float* x, size_t begin, size_t end, size_t h, size_t w, float* out, int64_t* index) {
  const size_t oh = h / 2, ow = w / 2;
  const auto width = static_cast<int64_t>(w);
  for (size_t p = begin; p < end; ++p) {
    const float* plane = x + p * h * w;
    for (size_t r = 0; r < oh; ++r) {
      const float* top = plane + 2 * r * w;
      const float* bottom = top + w;
      float* o = out + (p * oh + r) * ow;
      int64_t* at = index + (p * oh + r) * ow;
      const auto row0 = static_cast<int64_t>(2 * r * w);
      size_t c = 0;
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
      for (; c + 4 <= ow; c += 4) {
        const f4 t0 = load4(top + 2 * c), t1 = load4(top + 2 * c + 4);
        const f4 b0 = load4(bottom + 2 * c), b1 = load4(bottom + 2 * c + 4);
        u4 right_top, right_bottom, lower;
        const f4 t = duel4(__builtin_shufflevector(t0, t1, 0, 2, 4, 6), __builtin_shufflevector(t0, t1, 1, 3, 5, 7),
                           &right_top);
        const f4 b = duel4(__builtin_shufflevector(b0, b1, 0, 2, 4, 6), __builtin_shufflevector(b0, b1, 1, 3, 5, 7),
                           &right_bottom);
        const f4 m = duel4(t, b, &lower);
        std::memcpy(o + c, &m, sizeof m);
        const u4 right = (right_top & ~lower) | (right_bottom & lower);
        for (int lane = 0; lane < 4; ++lane)
          at[c + lane] = row0 + static_cast<int64_t>(2 * (c + lane) + (right[lane] & 1u)) +
                         static_cast<int64_t>(lower[lane] & 1u) * width;
      }
#endif
#endif
      for (; c < ow; ++c) {
        uint32_t right_top, right_bottom, lower;
        const float t = duel(top[2 * c], top[2 * c + 1], &right_top);
        const float b = duel(bottom[2 * c], bottom[2 * c + 1], &right_bottom);
        o[c] = duel(t, b, &lower);
        const uint32_t right = (right_top & ~lower) | (right_bottom & lower);   // all ones or zero
        at[c] = row0 + static_cast<int64_t>(2 * c + (right & 1u)) + static_cast<int64_t>(lower & 1u) * width;
      }
    }
  }
}

}  // namespace

void maxpool2x2(const float* x, size_t planes, size_t h, size_t w, float* out, int64_t* index) {
  // threads only for inputs of several MiB (a thread costs tens of microseconds to start)
  const size_t min_planes = std::max<size_t>(1, (size_t{1} << 20) / std::max<size_t>(1, h * w));
  parallel_for(planes, min_planes, [&](size_t, size_t begin, size_t end) {
    maxpool_planes(x, begin, end, h, w, out, index);
  });
}

}  // namespace pysim
