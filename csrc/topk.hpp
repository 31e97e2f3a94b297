// Top-k selection by magnitude without a full sort.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pysim {

// Indices (sorted ascending) of the k entries of x with the largest |x|.
// Among equal magnitudes at the boundary, lower indices win. Magnitudes are
// ordered by their bits, so NaN ranks above inf and is sent like any large
// entry (NaN in, NaN out, as a real run would). Throws std::invalid_argument
// if k is not in [1, n].
//
// Method: estimate a magnitude threshold from a block sample (4096 cache
// lines), keep every index at or above it in one branch-light pass over x
// (split over threads), then cut the few surplus candidates with nth_element.
// If the sample was unlucky and too few survive, fall back to an exact
// selection over all of x.
std::vector<uint32_t> topk_select(const float* x, size_t n, size_t k);

}  // namespace pysim
