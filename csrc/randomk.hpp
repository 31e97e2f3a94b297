// Random-k index sets drawn from a shared seed.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pysim {

// Mixes a base seed and a step number into the seed of one packet.
uint64_t derive_seed(uint64_t seed, uint64_t step);

// Writes k sorted indices in [0, n) chosen by seed: stratified sampling, one
// index drawn uniformly from each of k near-equal strata [j*n/k, (j+1)*n/k).
// Every index is kept with probability 1/len(stratum) ~= k/n, exactly k are
// kept, only k random numbers are drawn (a counter-based hash, so the result
// depends on (seed, n, k) alone) and the gather that follows walks memory
// forward.
void randomk_indices(uint64_t seed, uint64_t n, uint64_t k, uint32_t* idx);

}  // namespace pysim
