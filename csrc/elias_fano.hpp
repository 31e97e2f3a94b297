// Elias-Fano code for a strictly increasing sequence of k indices in [0, n).
//
// Each index is split into L = floor(log2(n / k)) low bits, stored verbatim,
// and a high part stored in unary as a bit vector of k + (((n - 1) >> L) + 1)
// bits. Size: ceil(k*L/8) + ceil((k + ((n-1) >> L) + 1) / 8) bytes, at most
// 2 + ceil(log2(n/k)) bits per index: within ~6% of the entropy bound
// H(k/n)*n/k at 1% density.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pysim {

unsigned elias_fano_low_bits(uint64_t n, uint64_t k);
size_t elias_fano_bytes(uint64_t n, uint64_t k);
// Writes elias_fano_bytes(n, k) bytes to out. idx must be strictly increasing and < n.
void elias_fano_encode(const uint32_t* idx, uint64_t k, uint64_t n, uint8_t* out);
// Decodes exactly k indices; throws std::invalid_argument if the code is not a
// canonical encoding of a strictly increasing sequence in [0, n).
void elias_fano_decode(const uint8_t* in, uint64_t k, uint64_t n, uint32_t* idx);

}  // namespace pysim
