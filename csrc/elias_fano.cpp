#include "elias_fano.hpp"

#include <cstring>
#include <vector>

#include "wire.hpp"

namespace pysim {
namespace {
inline uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
inline uint64_t high_bits(uint64_t n, uint64_t k, unsigned L) { return k + ((n - 1) >> L) + 1; }

// Where the parts of a code for (n, k) lie, and word buffers to assemble them in.
struct Layout {
  unsigned L;
  uint64_t mask, low_bytes, high_bits;
  Buffer<uint64_t> low, high;
  Layout(uint64_t n, uint64_t k)
      : L(elias_fano_low_bits(n, k)),
        mask(L == 0 ? 0 : (uint64_t{1} << L) - 1),
        low_bytes(ceil_div(k * L, 8)),
        high_bits(pysim::high_bits(n, k, L)),
        low(ceil_div(k * L, 64) + 1, 0),
        high(ceil_div(high_bits, 64), 0) {}
};
}  // namespace

unsigned elias_fano_low_bits(uint64_t n, uint64_t k) {
  if (k == 0 || n <= k) return 0;
  return 63u - static_cast<unsigned>(__builtin_clzll(n / k));
}

size_t elias_fano_bytes(uint64_t n, uint64_t k) {
  if (k == 0) return 0;
  const unsigned L = elias_fano_low_bits(n, k);
  return ceil_div(k * L, 8) + ceil_div(high_bits(n, k, L), 8);
}

void elias_fano_encode(const uint32_t* idx, uint64_t k, uint64_t n, uint8_t* out) {
  if (k == 0) return;
  Layout f(n, k);
  const unsigned L = f.L;
  const uint64_t mask = f.mask;
  Buffer<uint64_t>& low = f.low;
  Buffer<uint64_t>& high = f.high;
  for (uint64_t j = 0; j < k; ++j) {
    const uint64_t v = idx[j];
    if (L) {
      const uint64_t pos = j * L, w = pos >> 6, s = pos & 63;
      low[w] |= (v & mask) << s;
      if (s + L > 64) low[w + 1] |= (v & mask) >> (64 - s);
    }
    const uint64_t hp = (v >> L) + j;
    high[hp >> 6] |= uint64_t{1} << (hp & 63);
  }
  std::memcpy(out, low.data(), f.low_bytes);
  std::memcpy(out + f.low_bytes, high.data(), ceil_div(f.high_bits, 8));
}

void elias_fano_decode(const uint8_t* in, uint64_t k, uint64_t n, uint32_t* idx) {
  if (k == 0) return;
  Layout f(n, k);
  const unsigned L = f.L;
  const uint64_t low_bytes = f.low_bytes, hb = f.high_bits;
  Buffer<uint64_t>& low = f.low;
  Buffer<uint64_t>& high = f.high;
  std::memcpy(low.data(), in, low_bytes);
  std::memcpy(high.data(), in + low_bytes, ceil_div(hb, 8));
  if (hb & 63) {
    if (high.back() >> (hb & 63)) fail("top-k index code corrupted: padding bits are set");
  }
  if ((k * L) & 7) {
    if (in[low_bytes - 1] >> ((k * L) & 7)) fail("top-k index code corrupted: padding bits are set");
  }
  const uint64_t mask = f.mask;
  uint64_t j = 0;
  int64_t prev = -1;
  for (size_t w = 0; w < high.size(); ++w) {
    uint64_t word = high[w];
    while (word) {
      const uint64_t hp = (w << 6) + static_cast<uint64_t>(__builtin_ctzll(word));
      word &= word - 1;
      if (j == k) fail("top-k index code corrupted: more indices than k");
      uint64_t lowv = 0;
      if (L) {
        const uint64_t pos = j * L, lw = pos >> 6, s = pos & 63;
        lowv = low[lw] >> s;
        if (s + L > 64) lowv |= low[lw + 1] << (64 - s);
        lowv &= mask;
      }
      const uint64_t v = ((hp - j) << L) | lowv;
      if (v >= n || static_cast<int64_t>(v) <= prev) fail("top-k index code corrupted: indices out of order or range");
      idx[j++] = static_cast<uint32_t>(v);
      prev = static_cast<int64_t>(v);
    }
  }
  if (j != k) fail("top-k index code corrupted: fewer indices than k");
}

}  // namespace pysim
