// Packing and unpacking of the codecs into wire-format packets.
#pragma once
#include <cstdint>
#include <vector>

#include "wire.hpp"

namespace pysim {

struct Tensor {  // a flat float32 view plus the shape it came with
  const float* data;
  std::vector<uint32_t> shape;
  DType source_dtype;
};

Bytes pack_dense(const Tensor& x, DType value_dtype);
Bytes pack_topk(const Tensor& x, uint64_t k, DType value_dtype, IndexCode code);
Bytes pack_randomk(const Tensor& x, uint64_t k, uint64_t seed, DType value_dtype);
// Runs one PowerSGD round on x viewed as rows x (numel/rows): P = M Q,
// orthonormalise P, Q = M^T P. q (cols x rank) is the warm start and is
// overwritten with the new Q. The packet carries P and Q.
Bytes pack_lowrank(const Tensor& x, uint32_t rows, uint32_t rank, float* q, DType value_dtype);
// Block-absmax quantisation to int8 (codec Int8) or int4 (codec Int4); see quant.hpp.
Bytes pack_quant(const Tensor& x, Codec codec, uint32_t block, bool stochastic, uint64_t seed);
// Top-k with 2-bit values (codec TopK2): the k entries of largest magnitude, their
// values quantised to four levels per block of `block` values (quantize2 in
// quant.hpp), indices coded as in top-k.
Bytes pack_topk2(const Tensor& x, uint64_t k, uint32_t block, IndexCode code);

// Payload bytes of each codec (the header adds header_bytes(codec, ndim)).
// All fail (ValueError) rather than wrap around on overflow.
uint64_t dense_payload_bytes(uint64_t numel, DType d);
uint64_t topk_payload_bytes(uint64_t numel, uint64_t k, DType d, IndexCode code);
uint64_t randomk_payload_bytes(uint64_t k, DType d);
uint64_t lowrank_payload_bytes(uint64_t rows, uint64_t cols, uint64_t rank, DType d);
uint64_t topk2_payload_bytes(uint64_t numel, uint64_t k, uint64_t block, IndexCode code);

// Parses a packet (parse_packet) and checks everything its codec's header
// claims against the payload: k in [1, numel], rank <= min(rows, cols), the
// block size, flags, and that the payload length equals the codec's formula.
// Then checks the caller's limits (tensor size, expected shape). Throws
// std::invalid_argument before anything proportional to the claimed tensor
// size is allocated.
Header read_packet(const uint8_t* p, size_t len, const Limits& limits);

// The unpack functions take a header already checked by read_packet().
// Decodes any packet into a dense float32 buffer of h.numel values.
Floats unpack_dense(const uint8_t* p, const Header& h);
// For top-k and random-k packets: the sorted indices and their values.
void unpack_sparse(const uint8_t* p, const Header& h, Indices& idx, Floats& val);
// For low-rank packets: P (rows x rank) and Q (cols x rank).
void unpack_factors(const uint8_t* p, const Header& h, Floats& P, Floats& Q);

}  // namespace pysim
