// Block-absmax quantisation to int8 or int4.
//
// The tensor is cut into blocks of `block` consecutive elements (the last may
// be shorter). Per block the scale is s = absmax / Q (Q = 127 for int8, 7 for
// int4) rounded UP to bfloat16, so |x| / s <= Q and nothing clips; the value
// is v = round(x / s) in [-Q, Q]; the decoded value is v * s.
//
// Payload: ceil(n / block) bfloat16 scales, then the values: n bytes (int8,
// two's complement) or ceil(n / 2) bytes (int4, two's complement nibbles:
// element 2j in the low nibble of byte j, element 2j+1 in the high nibble; an
// unused final nibble is zero). -Q-1 (-128, -8) never appears; a packet that
// holds it, a negative or infinite scale, a NaN scale other than 0x7fc0, or a
// set padding nibble is rejected. A block holding NaN or inf is sent as scale
// 0x7fc0 (NaN) with zero values and decodes to NaN: non-finite values flow on
// as in a real run, and the run notices its loss (pysim.node).
//
// Rounding: nearest (ties to even) gives |x - v*s| <= s/2. Stochastic rounds
// x/s up with probability frac(x/s), using u = hash(seed, element index) in
// [0, 1) from a counter-based hash, so E[v*s] = x, |x - v*s| < s, and packing
// the same tensor with the same seed gives the same bytes.
//
// The scale costs 2 bytes per block: int8 sends (block + 2) bytes per block
// of 4*block fp32 bytes, 3.88x fewer at block 64, 3.94x at 128, 3.97x at 256;
// int4 sends (block/2 + 2): 7.11x fewer at 32, 7.53x at 64.
#pragma once
#include <cstddef>
#include <cstdint>

#include "wire.hpp"

namespace pysim {

constexpr uint64_t kMaxQuantBlock = uint64_t{1} << 24;

// Fails unless c is Int8 or Int4 and block is even and in [2, 2^24].
void check_quant_block(Codec c, uint64_t block);
uint64_t quant_payload_bytes(uint64_t numel, Codec c, uint64_t block);
// Writes quant_payload_bytes(n, c, block) bytes to out.
void quantize(const float* x, uint64_t n, Codec c, uint32_t block, bool stochastic, uint64_t seed, uint8_t* out);
// Decodes n values; fails on a corrupted scale or value (see above).
void dequantize(const uint8_t* in, uint64_t n, Codec c, uint32_t block, float* out);

// Two-bit values (the topk2 codec's): per block of `block` values one bf16
// scale s, the smallest bf16 >= the block's absmax, then codes c in 0..3
// standing for (2c - 3) * s / 3, i.e. -s, -s/3, s/3, s (four levels, no zero:
// made for the large values top-k keeps), rounded to the nearest level, so
// |x - v| <= s/3. Codes are packed four to a byte, element 4j + r in bits
// 2r..2r+1, the unused bits of the last byte zero. A block holding NaN or inf
// is sent as scale 0x7fc0 (NaN) with zero codes and decodes to NaN, as in
// int8/int4. Payload: 2 * ceil(n / block) + ceil(n / 4) bytes.
constexpr uint64_t kMaxQuant2Block = uint64_t{1} << 24;
// Fails unless block is a multiple of 4 in [4, 2^24].
void check_quant2_block(uint64_t block);
uint64_t quant2_payload_bytes(uint64_t n, uint64_t block);
void quantize2(const float* x, uint64_t n, uint32_t block, uint8_t* out);
// Decodes n values; fails on a corrupted scale or a set padding bit.
void dequantize2(const uint8_t* in, uint64_t n, uint32_t block, float* out);

}  // namespace pysim
