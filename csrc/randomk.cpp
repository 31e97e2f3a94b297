#include "randomk.hpp"

#include "parallel.hpp"
#include "wire.hpp"

namespace pysim {
namespace {
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

uint64_t derive_seed(uint64_t seed, uint64_t step) {
  return mix64(seed + 0x9e3779b97f4a7c15ull * (step + 1));
}

void randomk_indices(uint64_t seed, uint64_t n, uint64_t k, uint32_t* idx) {
  if (k < 1 || k > n) fail("random-k needs 1 <= k <= n, got k=" + std::to_string(k) + ", n=" + std::to_string(n));
  if (n > 0xffffffffull) fail("random-k supports tensors of fewer than 2^32 elements");
  const uint64_t key = mix64(seed ^ 0x243f6a8885a308d3ull);
  parallel_for(k, 1 << 18, [&](size_t, size_t b, size_t e) {
    for (uint64_t j = b; j < e; ++j) {
      const uint64_t lo = j * n / k, hi = (j + 1) * n / k;
      const uint64_t r = mix64(key + 0x9e3779b97f4a7c15ull * j) >> 32;
      idx[j] = static_cast<uint32_t>(lo + ((r * (hi - lo)) >> 32));
    }
  });
}

}  // namespace pysim
