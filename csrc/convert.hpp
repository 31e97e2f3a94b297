// float32 <-> float16 / bfloat16 conversion (round to nearest even).
#pragma once
#include <cstddef>
#include <cstdint>

#include "wire.hpp"

namespace pysim {

// Writes n values of x in dtype d to out (n * dtype_bytes(d) bytes).
void encode_values(const float* x, size_t n, DType d, uint8_t* out);
// Reads n values of dtype d from in (may be unaligned) into out.
void decode_values(const uint8_t* in, size_t n, DType d, float* out);

}  // namespace pysim
