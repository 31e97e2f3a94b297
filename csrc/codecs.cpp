#include "codecs.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "convert.hpp"
#include "elias_fano.hpp"
#include "lowrank.hpp"
#include "quant.hpp"
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
  Floats vals(k);
  for (uint64_t j = 0; j < k; ++j) vals[j] = x[idx[j]];
  encode_values(vals.data(), k, d, out);
}

constexpr uint64_t kMaxIndexable = 0xffffffffull;  // sparse and quantised codecs index with uint32

uint64_t index_bytes(uint64_t numel, uint64_t k, IndexCode code) {
  return code == IndexCode::Raw32 ? checked_mul(4, k, "top-k payload") : elias_fano_bytes(numel, k);
}

void check_sparse(const Header& h) {
  if (h.numel > kMaxIndexable)
    fail("sparse packet corrupted: " + std::to_string(h.numel) + " elements, more than 2^32 - 1");
  if (h.k < 1 || h.k > h.numel) fail("sparse packet corrupted: k=" + std::to_string(h.k) + " outside [1, numel]");
  uint64_t expect;
  if (h.codec == Codec::TopK) {
    if (h.flags > 1) fail("top-k packet has an unknown index code " + std::to_string(h.flags));
    expect = topk_payload_bytes(h.numel, h.k, h.value_dtype, static_cast<IndexCode>(h.flags));
  } else if (h.codec == Codec::TopK2) {
    if (h.flags > 1) fail("top-k packet has an unknown index code " + std::to_string(h.flags));
    if (h.value_dtype != DType::BF16) fail("2-bit top-k packet corrupted: scales must be bf16");
    if (h.block < 4 || h.block > kMaxQuant2Block || h.block % 4 != 0)
      fail("2-bit top-k packet corrupted: block " + std::to_string(h.block) + " is not a multiple of 4 in [4, 2^24]");
    expect = topk2_payload_bytes(h.numel, h.k, h.block, static_cast<IndexCode>(h.flags));
  } else {
    if (h.flags != 0) fail("random-k packet corrupted: flags must be zero");
    expect = randomk_payload_bytes(h.k, h.value_dtype);
  }
  if (expect != h.payload_bytes) fail("sparse packet corrupted: payload size does not match k and shape");
}

void check_lowrank(const Header& h) {
  if (h.flags != 0) fail("low-rank packet corrupted: flags must be zero");
  if (h.rows == 0 || h.numel % h.rows != 0) fail("low-rank packet corrupted: rows do not divide the tensor size");
  const uint64_t cols = h.numel / h.rows;
  if (h.rank < 1 || h.rank > std::min<uint64_t>(h.rows, cols))
    fail("low-rank packet corrupted: rank " + std::to_string(h.rank) + " outside [1, min(rows, cols)]");
  if (lowrank_payload_bytes(h.rows, cols, h.rank, h.value_dtype) != h.payload_bytes)
    fail("low-rank packet corrupted: payload size does not match rows, cols and rank");
}

void check_quant(const Header& h) {
  if (h.flags > 1) fail("quantised packet has an unknown rounding mode " + std::to_string(h.flags));
  if (h.flags == 0 && h.seed != 0) fail("quantised packet corrupted: nearest rounding with a non-zero seed");
  if (h.value_dtype != DType::BF16) fail("quantised packet corrupted: scales must be bf16");
  if (h.numel > kMaxIndexable) fail("quantised packet corrupted: more than 2^32 - 1 elements");
  if (quant_payload_bytes(h.numel, h.codec, h.block) != h.payload_bytes)
    fail("quantised packet corrupted: payload size does not match shape and block size");
}

std::string shape_str(const std::vector<uint32_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

}  // namespace

uint64_t dense_payload_bytes(uint64_t numel, DType d) { return checked_mul(numel, dtype_bytes(d), "dense payload"); }
uint64_t topk_payload_bytes(uint64_t numel, uint64_t k, DType d, IndexCode code) {
  if (k > numel || numel > kMaxIndexable) fail("top-k needs k <= numel < 2^32");
  return checked_add(checked_mul(k, dtype_bytes(d), "top-k payload"), index_bytes(numel, k, code), "top-k payload");
}
uint64_t topk2_payload_bytes(uint64_t numel, uint64_t k, uint64_t block, IndexCode code) {
  if (k > numel || numel > kMaxIndexable) fail("top-k needs k <= numel < 2^32");
  return checked_add(quant2_payload_bytes(k, block), index_bytes(numel, k, code), "top-k payload");
}
uint64_t randomk_payload_bytes(uint64_t k, DType d) { return checked_mul(k, dtype_bytes(d), "random-k payload"); }
uint64_t lowrank_payload_bytes(uint64_t rows, uint64_t cols, uint64_t rank, DType d) {
  const uint64_t values = checked_mul(checked_add(rows, cols, "low-rank payload"), rank, "low-rank payload");
  return checked_mul(values, dtype_bytes(d), "low-rank payload");
}

Header read_packet(const uint8_t* p, size_t len, const Limits& limits) {
  Header h = parse_packet(p, len);
  switch (h.codec) {
    case Codec::Dense:
      if (h.flags != 0) fail("dense packet corrupted: flags must be zero");
      if (dense_payload_bytes(h.numel, h.value_dtype) != h.payload_bytes)
        fail("dense packet corrupted: payload size does not match its shape");
      break;
    case Codec::TopK:
    case Codec::TopK2:
    case Codec::RandomK: check_sparse(h); break;
    case Codec::LowRank: check_lowrank(h); break;
    case Codec::Int8:
    case Codec::Int4: check_quant(h); break;
  }
  if (limits.expect_shape && *limits.expect_shape != h.shape)
    fail("packet holds a tensor of shape " + shape_str(h.shape) + ", expected " + shape_str(*limits.expect_shape) +
         "; pass the shape the sender packed");
  if (h.numel > limits.max_numel)
    fail("packet holds " + std::to_string(h.numel) + " elements, more than max_numel=" +
         std::to_string(limits.max_numel) + "; pass a larger max_numel (or expect_shape) if that size is expected");
  return h;
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

Bytes pack_topk2(const Tensor& x, uint64_t k, uint32_t block, IndexCode code) {
  Header h = make_header(Codec::TopK2, x, DType::BF16);
  if (code == IndexCode::Raw32 && h.numel > 0x7fffffffull) fail("raw int32 indices need fewer than 2^31 elements");
  check_quant2_block(block);
  const std::vector<uint32_t> idx = topk_select(x.data, h.numel, k);
  h.k = k;
  h.block = block;
  h.flags = static_cast<uint8_t>(code);
  h.payload_bytes = topk2_payload_bytes(h.numel, k, block, code);
  Bytes out = start_packet(h);
  uint8_t* p = out.data() + h.header_bytes;
  Floats vals(k);
  for (uint64_t j = 0; j < k; ++j) vals[j] = x.data[idx[j]];
  quantize2(vals.data(), k, block, p);
  p += quant2_payload_bytes(k, block);
  if (code == IndexCode::Raw32) std::memcpy(p, idx.data(), 4 * k);
  else elias_fano_encode(idx.data(), k, h.numel, p);
  seal(out);
  return out;
}

Bytes pack_randomk(const Tensor& x, uint64_t k, uint64_t seed, DType value_dtype) {
  Header h = make_header(Codec::RandomK, x, value_dtype);
  if (k < 1 || k > h.numel) fail("random-k needs 1 <= k <= n, got k=" + std::to_string(k) + ", n=" + std::to_string(h.numel));
  Indices idx(k);
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
  if (rows == 0 || h.numel % rows != 0) fail("low-rank rows must divide the tensor size");
  const uint64_t cols = h.numel / rows;
  if (rank < 1 || rank > std::min<uint64_t>(rows, cols))
    fail("low-rank rank must be in [1, min(rows, cols)] = [1, " + std::to_string(std::min<uint64_t>(rows, cols)) + "]");
  h.rows = rows;
  h.rank = rank;
  h.payload_bytes = lowrank_payload_bytes(rows, cols, rank, value_dtype);
  Floats P(static_cast<size_t>(rows) * rank);
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

Bytes pack_quant(const Tensor& x, Codec codec, uint32_t block, bool stochastic, uint64_t seed) {
  Header h = make_header(codec, x, DType::BF16);
  h.block = block;
  h.flags = stochastic ? 1 : 0;
  h.seed = stochastic ? seed : 0;
  h.payload_bytes = quant_payload_bytes(h.numel, codec, block);
  Bytes out = start_packet(h);
  quantize(x.data, h.numel, codec, block, stochastic, h.seed, out.data() + h.header_bytes);
  seal(out);
  return out;
}

void unpack_sparse(const uint8_t* p, const Header& h, Indices& idx, Floats& val) {
  if (h.codec != Codec::TopK && h.codec != Codec::RandomK && h.codec != Codec::TopK2)
    fail("packet is not a sparse (top-k or random-k) packet");
  const uint8_t* q = p + h.header_bytes;
  val.resize(h.k);
  idx.resize(h.k);
  if (h.codec == Codec::TopK2) {
    dequantize2(q, h.k, h.block, val.data());
    q += quant2_payload_bytes(h.k, h.block);
  } else {
    decode_values(q, h.k, h.value_dtype, val.data());
    q += h.k * dtype_bytes(h.value_dtype);
  }
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

void unpack_factors(const uint8_t* p, const Header& h, Floats& P, Floats& Q) {
  if (h.codec != Codec::LowRank) fail("packet is not a low-rank packet");
  const uint64_t cols = h.numel / h.rows;
  P.resize(static_cast<size_t>(h.rows) * h.rank);
  Q.resize(cols * h.rank);
  const uint8_t* q = p + h.header_bytes;
  decode_values(q, P.size(), h.value_dtype, P.data());
  decode_values(q + P.size() * dtype_bytes(h.value_dtype), Q.size(), h.value_dtype, Q.data());
}

Floats unpack_dense(const uint8_t* p, const Header& h) {
  switch (h.codec) {
    case Codec::Dense: {
      Floats out(h.numel);
      decode_values(p + h.header_bytes, h.numel, h.value_dtype, out.data());
      return out;
    }
    case Codec::TopK:
    case Codec::TopK2:
    case Codec::RandomK: {
      Indices idx;
      Floats val;
      unpack_sparse(p, h, idx, val);
      Floats out(h.numel, 0.0f);
      for (size_t j = 0; j < idx.size(); ++j) out[idx[j]] = val[j];
      return out;
    }
    case Codec::LowRank: {
      Floats P, Q;
      unpack_factors(p, h, P, Q);
      Floats out(h.numel);
      lowrank_expand(P.data(), h.rows, Q.data(), h.numel / h.rows, h.rank, out.data());
      return out;
    }
    case Codec::Int8:
    case Codec::Int4: {
      Floats out(h.numel);
      dequantize(p + h.header_bytes, h.numel, h.codec, h.block, out.data());
      return out;
    }
  }
  fail("unknown codec");
}

}  // namespace pysim
