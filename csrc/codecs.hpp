// Packing and unpacking of the four codecs into wire-format packets.
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

// Payload bytes of each codec (the header adds header_bytes(codec, ndim)).
uint64_t dense_payload_bytes(uint64_t numel, DType d);
uint64_t topk_payload_bytes(uint64_t numel, uint64_t k, DType d, IndexCode code);
uint64_t randomk_payload_bytes(uint64_t k, DType d);
uint64_t lowrank_payload_bytes(uint64_t rows, uint64_t cols, uint64_t rank, DType d);

// The unpack functions take a header already checked by parse_packet().
// Decodes any packet into a dense float32 buffer of h.numel values.
Floats unpack_dense(const uint8_t* p, const Header& h);
// For top-k and random-k packets: the sorted indices and their values.
void unpack_sparse(const uint8_t* p, const Header& h, std::vector<uint32_t>& idx, std::vector<float>& val);
// For low-rank packets: P (rows x rank) and Q (cols x rank).
void unpack_factors(const uint8_t* p, const Header& h, std::vector<float>& P, std::vector<float>& Q);

}  // namespace pysim
