#include "codecs.hpp"

#include <cmath>

#include "convert.hpp"
#include "elias_fano.hpp"
#include "lowrank.hpp"
#include "randomk.hpp"
#include "topk.hpp"

namespace pysim {
namespace {

Header make_header(Codec c, const Tensor& x, DType value_dtype) {
  Header h;
  h.codec = c;
  h.value_dtype = value_dtype;
  h.source_dtype = x.source_dtype;
  h.shape = x.shape;
  h.numel = checked_numel(x.shape);
  return h;
}

void gather_encode(const float* x, const uint32_t* idx, uint64_t k, DType d, uint8_t* out) {
  std::vector<float> vals(k);
  for (uint64_t j = 0; j < k; ++j) vals[j] = x[idx[j]];
  encode_values(vals.data(), k, d, out);
}

uint64_t lowrank_cols(const Header& h) {
  if (h.rows == 0 || h.numel % h.rows != 0) fail("low-rank packet corrupted: rows do not divide the tensor size");
  return h.numel / h.rows;
}

}  // namespace

uint64_t dense_payload_bytes(uint64_t numel, DType d) { return numel * dtype_bytes(d); }
uint64_t topk_payload_bytes(uint64_t numel, uint64_t k, DType d, IndexCode code) {
  return k * dtype_bytes(d) + (code == IndexCode::Raw32 ? 4 * k : elias_fano_bytes(numel, k));
}
uint64_t randomk_payload_bytes(uint64_t k, DType d) { return k * dtype_bytes(d); }
uint64_t lowrank_payload_bytes(uint64_t rows, uint64_t cols, uint64_t rank, DType d) {
  return (rows + cols) * rank * dtype_bytes(d);
}

Bytes pack_dense(const Tensor& x, DType value_dtype) {
  Header h = make_header(Codec::Dense, x, value_dtype);
  h.payload_bytes = dense_payload_bytes(h.numel, value_dtype);
  Bytes out = start_packet(h);
  encode_values(x.data, h.numel, value_dtype, out.data() + h.header_bytes);
  seal(out);
  return out;
}

Bytes pack_topk(const Tensor& x, uint64_t k, DType value_dtype, IndexCode code) {
  Header h = make_header(Codec::TopK, x, value_dtype);
  if (code == IndexCode::Raw32 && h.numel > 0x7fffffffull) fail("raw int32 indices need fewer than 2^31 elements");
  const std::vector<uint32_t> idx = topk_select(x.data, h.numel, k);
  h.k = k;
  h.flags = static_cast<uint8_t>(code);
  h.payload_bytes = topk_payload_bytes(h.numel, k, value_dtype, code);
  Bytes out = start_packet(h);
  uint8_t* p = out.data() + h.header_bytes;
  gather_encode(x.data, idx.data(), k, value_dtype, p);
  p += k * dtype_bytes(value_dtype);
  if (code == IndexCode::Raw32) std::memcpy(p, idx.data(), 4 * k);
  else elias_fano_encode(idx.data(), k, h.numel, p);
  seal(out);
  return out;
}

Bytes pack_randomk(const Tensor& x, uint64_t k, uint64_t seed, DType value_dtype) {
  Header h = make_header(Codec::RandomK, x, value_dtype);
  std::vector<uint32_t> idx(k);
  randomk_indices(seed, h.numel, k, idx.data());
  h.k = k;
  h.seed = seed;
  h.payload_bytes = randomk_payload_bytes(k, value_dtype);
  Bytes out = start_packet(h);
  gather_encode(x.data, idx.data(), k, value_dtype, out.data() + h.header_bytes);
  seal(out);
  return out;
}

Bytes pack_lowrank(const Tensor& x, uint32_t rows, uint32_t rank, float* q, DType value_dtype) {
  Header h = make_header(Codec::LowRank, x, value_dtype);
  if (rank < 1) fail("low-rank needs rank >= 1");
  if (rows == 0 || h.numel % rows != 0) fail("low-rank rows must divide the tensor size");
  const uint64_t cols = h.numel / rows;
  h.rows = rows;
  h.rank = rank;
  h.payload_bytes = lowrank_payload_bytes(rows, cols, rank, value_dtype);
  std::vector<float> P(static_cast<size_t>(rows) * rank);
  lowrank_mq(x.data, rows, cols, q, rank, P.data());
  orthonormalize_columns(P.data(), rows, rank);
  lowrank_mtp(x.data, rows, cols, P.data(), rank, q);
  Bytes out = start_packet(h);
  uint8_t* p = out.data() + h.header_bytes;
  encode_values(P.data(), P.size(), value_dtype, p);
  encode_values(q, cols * rank, value_dtype, p + P.size() * dtype_bytes(value_dtype));
  seal(out);
  return out;
}

void unpack_sparse(const uint8_t* p, const Header& h, std::vector<uint32_t>& idx, std::vector<float>& val) {
  if (h.codec != Codec::TopK && h.codec != Codec::RandomK) fail("packet is not a sparse (top-k or random-k) packet");
  if (h.k < 1 || h.k > h.numel) fail("sparse packet corrupted: k=" + std::to_string(h.k) + " outside [1, numel]");
  uint64_t expect;
  if (h.codec == Codec::TopK) {
    if (h.flags > 1) fail("top-k packet has an unknown index code " + std::to_string(h.flags));
    expect = topk_payload_bytes(h.numel, h.k, h.value_dtype, static_cast<IndexCode>(h.flags));
  } else {
    expect = randomk_payload_bytes(h.k, h.value_dtype);
  }
  if (expect != h.payload_bytes) fail("sparse packet corrupted: payload size does not match k and shape");
  const uint8_t* q = p + h.header_bytes;
  val.resize(h.k);
  idx.resize(h.k);
  decode_values(q, h.k, h.value_dtype, val.data());
  q += h.k * dtype_bytes(h.value_dtype);
  if (h.codec == Codec::RandomK) {
    randomk_indices(h.seed, h.numel, h.k, idx.data());
  } else if (h.flags == static_cast<uint8_t>(IndexCode::Raw32)) {
    std::memcpy(idx.data(), q, 4 * h.k);
    for (uint64_t j = 0; j < h.k; ++j)
      if (idx[j] >= h.numel || (j && idx[j] <= idx[j - 1])) fail("top-k packet corrupted: indices out of order or range");
  } else {
    elias_fano_decode(q, h.k, h.numel, idx.data());
  }
}

void unpack_factors(const uint8_t* p, const Header& h, std::vector<float>& P, std::vector<float>& Q) {
  if (h.codec != Codec::LowRank) fail("packet is not a low-rank packet");
  const uint64_t cols = lowrank_cols(h);
  if (h.rank < 1 || lowrank_payload_bytes(h.rows, cols, h.rank, h.value_dtype) != h.payload_bytes)
    fail("low-rank packet corrupted: payload size does not match rows, cols and rank");
  P.resize(static_cast<size_t>(h.rows) * h.rank);
  Q.resize(cols * h.rank);
  const uint8_t* q = p + h.header_bytes;
  decode_values(q, P.size(), h.value_dtype, P.data());
  decode_values(q + P.size() * dtype_bytes(h.value_dtype), Q.size(), h.value_dtype, Q.data());
}

Floats unpack_dense(const uint8_t* p, const Header& h) {
  switch (h.codec) {
    case Codec::Dense: {
      if (dense_payload_bytes(h.numel, h.value_dtype) != h.payload_bytes)
        fail("dense packet corrupted: payload size does not match its shape");
      Floats out(h.numel);
      decode_values(p + h.header_bytes, h.numel, h.value_dtype, out.data());
      return out;
    }
    case Codec::TopK:
    case Codec::RandomK: {
      std::vector<uint32_t> idx;
      std::vector<float> val;
      unpack_sparse(p, h, idx, val);
      Floats out(h.numel, 0.0f);
      for (size_t j = 0; j < idx.size(); ++j) out[idx[j]] = val[j];
      return out;
    }
    case Codec::LowRank: {
      std::vector<float> P, Q;
      unpack_factors(p, h, P, Q);
      Floats out(h.numel);
      lowrank_expand(P.data(), h.rows, Q.data(), h.numel / h.rows, h.rank, out.data());
      return out;
    }
  }
  fail("unknown codec");
}

}  // namespace pysim
