#include "topk.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "parallel.hpp"
#include "wire.hpp"

namespace pysim {
namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;

inline uint32_t abs_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u & kAbsMask; }

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Appends to out every i in [b, e) with abs_bits(x[i]) >= t. Blocks of 16 are
// first tested with a vectorisable "any" reduction; most blocks hold no hit.
void filter_range(const float* x, size_t b, size_t e, uint32_t t, std::vector<uint32_t>& out) {
  constexpr size_t W = 16;
  size_t i = b;
  size_t c = out.size();
  auto reserve = [&](size_t need) {
    if (out.size() < c + need) out.resize(std::max(out.size() * 2, c + need));
  };
  reserve(4 * W);
  for (; i + W <= e; i += W) {
    uint32_t any = 0;
    uint32_t a[W];
    std::memcpy(a, x + i, sizeof(a));
    for (size_t l = 0; l < W; ++l) any |= ((a[l] & kAbsMask) >= t);
    if (!any) continue;
    reserve(W);
    for (size_t l = 0; l < W; ++l) {
      out[c] = static_cast<uint32_t>(i + l);
      c += ((a[l] & kAbsMask) >= t);
    }
  }
  reserve(W);
  for (; i < e; ++i) { out[c] = static_cast<uint32_t>(i); c += (abs_bits(x[i]) >= t); }
  out.resize(c);
}

// Keeps the k largest of the candidate indices (already sorted), preserving order.
std::vector<uint32_t> cut_to_k(const float* x, std::vector<uint32_t> cand, size_t k) {
  if (cand.size() == k) return cand;
  std::vector<uint32_t> keys(cand.size());
  for (size_t j = 0; j < cand.size(); ++j) keys[j] = abs_bits(x[cand[j]]);
  std::vector<uint32_t> tmp(keys);
  std::nth_element(tmp.begin(), tmp.begin() + static_cast<ptrdiff_t>(k - 1), tmp.end(), std::greater<uint32_t>());
  const uint32_t tk = tmp[k - 1];
  size_t gt = 0;
  for (uint32_t v : keys) gt += (v > tk);
  size_t eq_left = k - gt, c = 0;
  for (size_t j = 0; j < cand.size(); ++j) {
    const bool take = keys[j] > tk || (keys[j] == tk && eq_left > 0);
    if (keys[j] == tk && take) --eq_left;
    cand[c] = cand[j];
    c += take;
  }
  cand.resize(c);
  return cand;
}

std::vector<uint32_t> filter_all(const float* x, size_t n, uint32_t t, size_t expect) {
  const size_t parts = parts_for(n, 1 << 19);
  std::vector<std::vector<uint32_t>> per(parts);
  for (auto& v : per) v.reserve(expect / parts + 1024);
  parallel_parts(n, parts, [&](size_t p, size_t b, size_t e) { filter_range(x, b, e, t, per[p]); });
  if (parts == 1) return std::move(per[0]);
  size_t total = 0;
  for (auto& v : per) total += v.size();
  std::vector<uint32_t> out;
  out.reserve(total);
  for (auto& v : per) out.insert(out.end(), v.begin(), v.end());
  return out;
}

}  // namespace

std::vector<uint32_t> topk_select(const float* x, size_t n, size_t k) {
  if (k < 1 || k > n) fail("top-k needs 1 <= k <= n, got k=" + std::to_string(k) + ", n=" + std::to_string(n));
  if (n > 0xffffffffull) fail("top-k supports tensors of fewer than 2^32 elements");
  constexpr size_t kLine = 16, kBlocks = 4096;
  if (n < 4 * kLine * kBlocks || k * 8 > n) {
    // Small or dense selections: exact threshold by nth_element over all magnitudes.
    std::vector<uint32_t> keys(n);
    for (size_t i = 0; i < n; ++i) keys[i] = abs_bits(x[i]);
    std::nth_element(keys.begin(), keys.begin() + static_cast<ptrdiff_t>(k - 1), keys.end(), std::greater<uint32_t>());
    std::vector<uint32_t> cand = filter_all(x, n, keys[k - 1], k);
    return cut_to_k(x, std::move(cand), k);
  }
  // Block sample: kBlocks random cache-line-sized blocks.
  std::vector<uint32_t> sample(kBlocks * kLine);
  const size_t nlines = n / kLine;
  uint64_t s = 0x5eed ^ n ^ (k << 20);
  for (size_t b = 0; b < kBlocks; ++b) {
    s = splitmix64(s);
    const size_t line = static_cast<size_t>((s >> 32) * nlines >> 32);
    for (size_t l = 0; l < kLine; ++l) sample[b * kLine + l] = abs_bits(x[line * kLine + l]);
  }
  const double ns = static_cast<double>(sample.size());
  const double expect = ns * static_cast<double>(k) / static_cast<double>(n);
  size_t r = static_cast<size_t>(std::ceil(expect * 1.05 + 4.0 * std::sqrt(expect) + 8.0));
  r = std::min(r, sample.size());
  std::nth_element(sample.begin(), sample.begin() + static_cast<ptrdiff_t>(r - 1), sample.end(), std::greater<uint32_t>());
  const uint32_t t = sample[r - 1];
  std::vector<uint32_t> cand = filter_all(x, n, t, static_cast<size_t>(static_cast<double>(n) * r / ns * 1.25));
  if (cand.size() < k) cand = filter_all(x, n, 0, n);  // unlucky sample: exact fallback
  return cut_to_k(x, std::move(cand), k);
}

}  // namespace pysim
