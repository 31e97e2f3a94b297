// pysim._C: the compression core, operating on NumPy-compatible buffers so the
// extension builds without torch. Errors in input or packets raise ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>

#include "codecs.hpp"
#include "elias_fano.hpp"
#include "lowrank.hpp"
#include "maxpool.hpp"
#include "parallel.hpp"
#include "pieces.hpp"
#include "quant.hpp"
#include "randomk.hpp"
#include "ring.hpp"
#include "topk.hpp"

namespace py = pybind11;
using namespace pysim;

namespace {

using F32Array = py::array_t<float, py::array::c_style>;

// Hands a vector's buffer to NumPy without copying; the capsule frees it.
template <typename V>
py::array_t<typename V::value_type> to_numpy(V&& v) {
  using T = typename V::value_type;
  auto holder = std::make_unique<V>(std::move(v));
  V* raw = holder.get();
  py::capsule owner(raw, [](void* p) { delete static_cast<V*>(p); });
  holder.release();
  return py::array_t<T>({static_cast<py::ssize_t>(raw->size())}, {static_cast<py::ssize_t>(sizeof(T))}, raw->data(), owner);
}

// Checks that a is a C-contiguous float32 array and returns its data.
const float* f32_data(const py::array& a, const char* what) {
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4)
    fail(std::string(what) + " must be float32, got dtype " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) fail(std::string(what) + " must be C-contiguous");
  return static_cast<const float*>(a.data());
}

float* f32_mut(py::array& a, const char* what) {
  f32_data(a, what);
  if (!a.writeable()) fail(std::string(what) + " must be writeable");
  return static_cast<float*>(a.mutable_data());
}

// The bytes of a packet buffer. The returned view borrows the buffer: callers
// keep `packet` alive (it is an argument of the bound function) while using it.
std::pair<const uint8_t*, size_t> bytes_of(const py::buffer& b) {
  py::buffer_info info;
  try {
    info = b.request();
  } catch (const py::error_already_set&) {  // e.g. BufferError from a non-contiguous memoryview
    fail("a packet must be a contiguous 1-D buffer of bytes");
  }
  if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1)
    fail("a packet must be a contiguous 1-D buffer of bytes");
  return {static_cast<const uint8_t*>(info.ptr), static_cast<size_t>(info.shape[0])};
}

Tensor tensor_of(const py::array& x, const std::vector<uint32_t>& shape, int source_dtype) {
  Tensor t{f32_data(x, "tensor"), shape, dtype_from_int(source_dtype)};
  if (checked_numel(shape) != static_cast<uint64_t>(x.size()))
    fail("shape does not match the number of elements in the tensor");
  return t;
}

py::dict header_dict(const Header& h) {
  py::dict d;
  d["codec"] = codec_name(h.codec);
  d["value_dtype"] = static_cast<int>(h.value_dtype);
  d["source_dtype"] = static_cast<int>(h.source_dtype);
  d["shape"] = h.shape;
  d["numel"] = h.numel;
  d["header_bytes"] = h.header_bytes;
  d["payload_bytes"] = h.payload_bytes;
  d["k"] = h.k;
  d["seed"] = h.seed;
  d["rows"] = h.rows;
  d["rank"] = h.rank;
  d["block"] = h.block;
  d["flags"] = static_cast<int>(h.flags);
  return d;
}

// A writeable contiguous 1-D uint8 array's bytes.
uint8_t* bytes_mut(py::array& a, const char* what) {
  if (a.ndim() != 1 || a.itemsize() != 1 || a.dtype().kind() != 'u' || !(a.flags() & py::array::c_style))
    fail(std::string(what) + " must be a contiguous 1-D uint8 array");
  if (!a.writeable()) fail(std::string(what) + " must be writeable");
  return static_cast<uint8_t*>(a.mutable_data());
}

// The number of values a piece of `bytes` bytes holds in dtype d, or a ValueError.
size_t piece_values(size_t bytes, size_t values, DType d, const char* what) {
  if (bytes != values * dtype_bytes(d))
    fail(std::string(what) + " holds " + std::to_string(bytes) + " bytes, not " + std::to_string(values) +
         " values of " + std::to_string(dtype_bytes(d)) + " bytes");
  return values;
}

Limits limits_of(uint64_t max_numel, const std::optional<std::vector<uint32_t>>& expect_shape) {
  Limits l;
  l.max_numel = max_numel;
  l.expect_shape = expect_shape ? &*expect_shape : nullptr;
  return l;
}

// A ring all-reduce's in-memory hops (ring.hpp) over one collective's buffers, kept alive with it.
class RingBatch {
 public:
  RingBatch(py::array arena, const py::list& xs, const py::list& rs, size_t size, int value_dtype)
      : arena_(std::move(arena)), size_(size), dtype_(dtype_from_int(value_dtype)) {
    bytes_mut(arena_, "arena");
    if (xs.size() != rs.size()) fail("ring batch needs one result per input");
    for (size_t i = 0; i < xs.size(); ++i) {
      py::array x = py::reinterpret_borrow<py::array>(xs[i]);
      py::array r = py::reinterpret_borrow<py::array>(rs[i]);
      const float* px = f32_data(x, "ring input");
      float* pr = f32_mut(r, "ring result");
      if (static_cast<size_t>(x.size()) != size || static_cast<size_t>(r.size()) != size)
        fail("ring inputs and results must hold " + std::to_string(size) + " values each");
      keep_.push_back(x);
      keep_.push_back(r);
      xs_.push_back(px);
      rs_.push_back(pr);
    }
  }

  void run(const py::array& hops) {
    if (!py::isinstance<py::array_t<int64_t>>(hops) || hops.ndim() != 2 || hops.shape(1) != 7 ||
        !(hops.flags() & py::array::c_style))
      fail("ring hops must be a C-contiguous int64 array of shape (n, 7)");
    const auto* h = static_cast<const RingHop*>(hops.data());
    const size_t n = static_cast<size_t>(hops.shape(0));
    uint8_t* arena = static_cast<uint8_t*>(arena_.mutable_data());
    const size_t len = static_cast<size_t>(arena_.size());
    py::gil_scoped_release nogil;
    ring_hops(arena, len, xs_, rs_, size_, dtype_, h, n);
  }

 private:
  py::array arena_;
  std::vector<py::array> keep_;
  std::vector<const float*> xs_;
  std::vector<float*> rs_;
  size_t size_;
  DType dtype_;
};

Codec quant_codec(int bits) {
  if (bits != 8 && bits != 4) fail("quantisation bits must be 8 or 4, got " + std::to_string(bits));
  return bits == 8 ? Codec::Int8 : Codec::Int4;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pysim compression core: codecs, wire format and kernels (C++17).";

  m.def("maxpool2x2", [](const py::array& x, py::array out, py::array index) {
    // x: (planes, h, w) float32; out: (planes, h/2, w/2) float32; index: the same, int64
    if (x.ndim() != 3) fail("maxpool2x2: x must be 3-D (planes, height, width)");
    const float* src = f32_data(x, "maxpool2x2 input");
    float* dst = f32_mut(out, "maxpool2x2 output");
    const auto planes = static_cast<size_t>(x.shape(0)), h = static_cast<size_t>(x.shape(1)),
               w = static_cast<size_t>(x.shape(2));
    if (out.ndim() != 3 || static_cast<size_t>(out.shape(0)) != planes || static_cast<size_t>(out.shape(1)) != h / 2 ||
        static_cast<size_t>(out.shape(2)) != w / 2)
      fail("maxpool2x2: the output must be (planes, height / 2, width / 2)");
    if (!py::isinstance<py::array_t<int64_t>>(index) || index.dtype().kind() != 'i' || index.itemsize() != 8 ||
        !(index.flags() & py::array::c_style) || !index.writeable() || index.ndim() != 3 ||
        index.shape(0) != out.shape(0) || index.shape(1) != out.shape(1) || index.shape(2) != out.shape(2))
      fail("maxpool2x2: the index must be a writeable C-contiguous int64 array shaped like the output");
    auto* at = static_cast<int64_t*>(index.mutable_data());
    py::gil_scoped_release release;
    maxpool2x2(src, planes, h, w, dst, at);
  }, py::arg("x"), py::arg("out"), py::arg("index"),
  "2x2 max pooling, stride 2, of float32 planes (torch's max_pool2d rule, bit for bit) and the argmax of each window.");
  m.def("set_num_threads", &pysim::set_num_threads, py::arg("n"),
        "Threads the kernels may use for large inputs (default: min(8, cores)).");
  m.def("get_num_threads", &pysim::num_threads);

  m.def("header_bytes", [](int codec, size_t ndim) {
    if (ndim > static_cast<size_t>(kMaxDims)) fail("packets hold at most 8 dimensions");
    return header_bytes(codec_from_int(codec), ndim);
  }, py::arg("codec"), py::arg("ndim"), "Header size in bytes for a codec id and tensor rank.");
  m.def("dense_payload_bytes", [](uint64_t n, int d) { return dense_payload_bytes(n, dtype_from_int(d)); },
        py::arg("numel"), py::arg("value_dtype"));
  m.def("topk_payload_bytes", [](uint64_t n, uint64_t k, int d, int code) {
    if (code < 0 || code > 1) fail("index_code must be 0 (Elias-Fano) or 1 (raw int32)");
    return topk_payload_bytes(n, k, dtype_from_int(d), static_cast<IndexCode>(code));
  }, py::arg("numel"), py::arg("k"), py::arg("value_dtype"), py::arg("index_code"));
  m.def("randomk_payload_bytes", [](uint64_t k, int d) { return randomk_payload_bytes(k, dtype_from_int(d)); },
        py::arg("k"), py::arg("value_dtype"));
  m.def("lowrank_payload_bytes", [](uint64_t rows, uint64_t cols, uint64_t rank, int d) {
    return lowrank_payload_bytes(rows, cols, rank, dtype_from_int(d));
  }, py::arg("rows"), py::arg("cols"), py::arg("rank"), py::arg("value_dtype"));
  m.def("topk2_payload_bytes", [](uint64_t n, uint64_t k, uint64_t block, int code) {
    if (code < 0 || code > 1) fail("index_code must be 0 (Elias-Fano) or 1 (raw int32)");
    return topk2_payload_bytes(n, k, block, static_cast<IndexCode>(code));
  }, py::arg("numel"), py::arg("k"), py::arg("block"), py::arg("index_code"));
  m.def("quant_payload_bytes", [](uint64_t n, int bits, uint64_t block) {
    return quant_payload_bytes(n, quant_codec(bits), block);
  }, py::arg("numel"), py::arg("bits"), py::arg("block"));
  m.def("elias_fano_bytes", &elias_fano_bytes, py::arg("n"), py::arg("k"));
  m.def("crc32c", [](const py::buffer& b, uint32_t crc) { auto [p, n] = bytes_of(b); return crc32c(p, n, crc); },
        py::arg("data"), py::arg("crc") = 0,
        "CRC-32C (Castagnoli) of a byte buffer, as the packet checksum uses it; crc continues an earlier one.");
  m.def("packet_length", [](const py::buffer& b) { auto [p, n] = bytes_of(b); return announced_length(p, n); },
        py::arg("packet"), "Header + payload bytes that the packet starting this buffer announces.");
  m.def("peak_buffer_bytes", &peak_buffer_bytes, py::arg("reset") = true,
        "Most bytes the extension's buffers held at once since the last reset (then resets to the current).");

  m.def("pack_dense", [](const py::array& x, std::vector<uint32_t> shape, int source_dtype, int value_dtype) {
    Tensor t = tensor_of(x, shape, source_dtype);
    DType d = dtype_from_int(value_dtype);
    Bytes out;
    { py::gil_scoped_release nogil; out = pack_dense(t, d); }
    return to_numpy(std::move(out));
  }, py::arg("x"), py::arg("shape"), py::arg("source_dtype"), py::arg("value_dtype"));

  m.def("pack_topk", [](const py::array& x, std::vector<uint32_t> shape, int source_dtype, uint64_t k, int value_dtype, int index_code) {
    Tensor t = tensor_of(x, shape, source_dtype);
    DType d = dtype_from_int(value_dtype);
    if (index_code < 0 || index_code > 1) fail("index_code must be 0 (Elias-Fano) or 1 (raw int32)");
    Bytes out;
    { py::gil_scoped_release nogil; out = pack_topk(t, k, d, static_cast<IndexCode>(index_code)); }
    return to_numpy(std::move(out));
  }, py::arg("x"), py::arg("shape"), py::arg("source_dtype"), py::arg("k"), py::arg("value_dtype"), py::arg("index_code"));

  m.def("pack_topk2", [](const py::array& x, std::vector<uint32_t> shape, int source_dtype, uint64_t k, uint32_t block, int index_code) {
    Tensor t = tensor_of(x, shape, source_dtype);
    if (index_code < 0 || index_code > 1) fail("index_code must be 0 (Elias-Fano) or 1 (raw int32)");
    Bytes out;
    { py::gil_scoped_release nogil; out = pack_topk2(t, k, block, static_cast<IndexCode>(index_code)); }
    return to_numpy(std::move(out));
  }, py::arg("x"), py::arg("shape"), py::arg("source_dtype"), py::arg("k"), py::arg("block"), py::arg("index_code"),
     "Top-k with 2-bit values (four levels per block of values, bf16 scales).");

  m.def("pack_randomk", [](const py::array& x, std::vector<uint32_t> shape, int source_dtype, uint64_t k, uint64_t seed, int value_dtype) {
    Tensor t = tensor_of(x, shape, source_dtype);
    DType d = dtype_from_int(value_dtype);
    Bytes out;
    { py::gil_scoped_release nogil; out = pack_randomk(t, k, seed, d); }
    return to_numpy(std::move(out));
  }, py::arg("x"), py::arg("shape"), py::arg("source_dtype"), py::arg("k"), py::arg("seed"), py::arg("value_dtype"));

  m.def("pack_lowrank", [](const py::array& x, std::vector<uint32_t> shape, int source_dtype, uint32_t rows, py::array q, int value_dtype) {
    Tensor t = tensor_of(x, shape, source_dtype);
    DType d = dtype_from_int(value_dtype);
    if (rows == 0 || checked_numel(shape) % rows) fail("rows must divide the tensor size");
    const uint64_t cols = checked_numel(shape) / rows;
    if (q.ndim() != 2 || static_cast<uint64_t>(q.shape(0)) != cols || q.shape(1) < 1)
      fail("warm-start Q must have shape (cols, rank) = (" + std::to_string(cols) + ", rank)");
    f32_mut(q, "warm-start Q");
    const uint32_t rank = static_cast<uint32_t>(q.shape(1));
    // The kernel works on a private copy of Q, so the caller's array is never
    // written while the GIL is released; the new Q is copied back afterwards.
    Floats work(static_cast<const float*>(q.data()), static_cast<const float*>(q.data()) + cols * rank);
    Bytes out;
    { py::gil_scoped_release nogil; out = pack_lowrank(t, rows, rank, work.data(), d); }
    std::memcpy(f32_mut(q, "warm-start Q"), work.data(), work.size() * sizeof(float));
    return to_numpy(std::move(out));
  }, py::arg("x"), py::arg("shape"), py::arg("source_dtype"), py::arg("rows"), py::arg("q"), py::arg("value_dtype"),
     "One PowerSGD round; q (cols x rank, float32) is updated in place to the new Q.");

  m.def("pack_quant", [](const py::array& x, std::vector<uint32_t> shape, int source_dtype, int bits, uint32_t block,
                         bool stochastic, uint64_t seed) {
    Tensor t = tensor_of(x, shape, source_dtype);
    const Codec c = quant_codec(bits);
    check_quant_block(c, block);
    Bytes out;
    { py::gil_scoped_release nogil; out = pack_quant(t, c, block, stochastic, seed); }
    return to_numpy(std::move(out));
  }, py::arg("x"), py::arg("shape"), py::arg("source_dtype"), py::arg("bits"), py::arg("block"), py::arg("stochastic"),
     py::arg("seed"), "Block-absmax int8/int4 quantisation (bf16 scales); seed is used by stochastic rounding only.");

  // Dense packets piece by piece (pieces.hpp): a ring hop's codec work overlaps the wire.
  m.def("dense_header", [](std::vector<uint32_t> shape, int source_dtype, int value_dtype) {
    return to_numpy(dense_header(shape, dtype_from_int(source_dtype), dtype_from_int(value_dtype)));
  }, py::arg("shape"), py::arg("source_dtype"), py::arg("value_dtype"),
     "The header of a dense packet of this shape, checksum field zero.");
  m.def("seal_header", [](py::array header, uint32_t crc) {
    uint8_t* h = bytes_mut(header, "header");
    if (header.size() < static_cast<py::ssize_t>(kBaseHeaderBytes)) fail("header shorter than 24 bytes");
    put_checksum(h, crc);
  }, py::arg("header"), py::arg("crc"), "Writes the chained CRC into a streamed packet's header.");
  m.def("encode_piece", [](const py::array& x, py::array out, int value_dtype, uint32_t crc) {
    const float* px = f32_data(x, "x");
    const DType d = dtype_from_int(value_dtype);
    const size_t n = piece_values(static_cast<size_t>(out.size()), static_cast<size_t>(x.size()), d, "out");
    uint8_t* po = bytes_mut(out, "out");
    py::gil_scoped_release nogil;
    return encode_piece(px, n, d, po, crc);
  }, py::arg("x"), py::arg("out"), py::arg("value_dtype"), py::arg("crc"),
     "out = x encoded; returns crc continued over out.");
  m.def("add_encode_piece", [](const py::buffer& got, const py::array& x, py::array out, int value_dtype,
                               uint32_t crc_got, uint32_t crc_out) {
    auto [pg, ng] = bytes_of(got);
    const float* px = f32_data(x, "x");
    const DType d = dtype_from_int(value_dtype);
    const size_t n = piece_values(ng, static_cast<size_t>(x.size()), d, "got");
    piece_values(static_cast<size_t>(out.size()), n, d, "out");
    uint8_t* po = bytes_mut(out, "out");
    std::pair<uint32_t, uint32_t> crcs;
    { py::gil_scoped_release nogil; crcs = add_encode_piece(pg, px, n, d, po, crc_got, crc_out); }
    return py::make_tuple(crcs.first, crcs.second);
  }, py::arg("got"), py::arg("x"), py::arg("out"), py::arg("value_dtype"), py::arg("crc_got"), py::arg("crc_out"),
     "out = encode(decode(got) + x); returns the crcs continued over got and over out.");
  m.def("decode_piece", [](const py::buffer& got, py::array out, int value_dtype, float divisor, uint32_t crc) {
    auto [pg, ng] = bytes_of(got);
    const DType d = dtype_from_int(value_dtype);
    float* po = f32_mut(out, "out");
    const size_t n = piece_values(ng, static_cast<size_t>(out.size()), d, "got");
    py::gil_scoped_release nogil;
    return decode_piece(pg, n, d, divisor, po, crc);
  }, py::arg("got"), py::arg("out"), py::arg("value_dtype"), py::arg("divisor"), py::arg("crc"),
     "out = decode(got) / divisor; returns crc continued over got.");
  m.def("check_streamed", [](const py::buffer& packet, const py::buffer& expected, uint32_t crc) {
    auto [p, n] = bytes_of(packet);
    auto [e, hn] = bytes_of(expected);
    py::gil_scoped_release nogil;
    check_streamed(p, n, e, hn, crc);
  }, py::arg("packet"), py::arg("expected_header"), py::arg("crc"),
     "Raises ValueError unless a streamed packet is the expected one with the chained CRC.");

  py::class_<RingBatch>(m, "RingBatch",
                        "A ring all-reduce's hops run in memory between the members of one process (ring.hpp).")
      .def(py::init<py::array, const py::list&, const py::list&, size_t, int>(), py::arg("arena"),
           py::arg("xs"), py::arg("rs"), py::arg("size"), py::arg("value_dtype"))
      .def("run", &RingBatch::run, py::arg("hops"),
           "Runs the hops (rows of mode, in_off, out_off, row, a, b, divisor) in order; ValueError for a bad packet.");
  m.def("dense_packet_bytes", [](size_t n, int value_dtype) { return dense_packet_bytes(n, dtype_from_int(value_dtype)); },
        py::arg("n"), py::arg("value_dtype"), "Bytes of a 1-D dense packet of n values.");

  m.def("parse_header", [](const py::buffer& packet) {
    auto [p, n] = bytes_of(packet);
    Limits any;
    any.max_numel = kMaxNumel;
    return header_dict(read_packet(p, n, any));
  }, py::arg("packet"), "Validates a packet (size, checksum, structure) and returns its header as a dict.");

  m.def("unpack", [](const py::buffer& packet, uint64_t max_numel, std::optional<std::vector<uint32_t>> expect_shape) {
    auto [p, n] = bytes_of(packet);
    const Limits limits = limits_of(max_numel, expect_shape);
    Floats out;
    Header h;
    { py::gil_scoped_release nogil; h = read_packet(p, n, limits); out = unpack_dense(p, h); }
    return py::make_tuple(header_dict(h), to_numpy(std::move(out)));
  }, py::arg("packet"), py::arg("max_numel") = kDefaultMaxNumel, py::arg("expect_shape") = py::none(),
     "Decodes any packet to (header, flat float32 array); refuses tensors over max_numel or not of expect_shape.");

  m.def("unpack_factors", [](const py::buffer& packet, uint64_t max_numel, std::optional<std::vector<uint32_t>> expect_shape) {
    auto [p, n] = bytes_of(packet);
    const Limits limits = limits_of(max_numel, expect_shape);
    Floats P, Q;
    Header h;
    { py::gil_scoped_release nogil; h = read_packet(p, n, limits); unpack_factors(p, h, P, Q); }
    const py::ssize_t rows = h.rows, rank = h.rank, cols = static_cast<py::ssize_t>(h.numel / h.rows);
    return py::make_tuple(header_dict(h), to_numpy(std::move(P)).reshape({rows, rank}), to_numpy(std::move(Q)).reshape({cols, rank}));
  }, py::arg("packet"), py::arg("max_numel") = kDefaultMaxNumel, py::arg("expect_shape") = py::none(),
     "Decodes a low-rank packet to (header, P rows x rank, Q cols x rank).");

  m.def("unpack_sparse", [](const py::buffer& packet, uint64_t max_numel, std::optional<std::vector<uint32_t>> expect_shape) {
    auto [p, n] = bytes_of(packet);
    const Limits limits = limits_of(max_numel, expect_shape);
    Indices idx;
    Floats val;
    Header h;
    { py::gil_scoped_release nogil; h = read_packet(p, n, limits); unpack_sparse(p, h, idx, val); }
    return py::make_tuple(header_dict(h), to_numpy(std::move(idx)), to_numpy(std::move(val)));
  }, py::arg("packet"), py::arg("max_numel") = kDefaultMaxNumel, py::arg("expect_shape") = py::none(),
     "Decodes a top-k or random-k packet to (header, sorted indices uint32, values float32).");

  m.def("topk_select", [](const py::array& x, uint64_t k) {
    const float* d = f32_data(x, "x");
    const size_t n = static_cast<size_t>(x.size());
    std::vector<uint32_t> idx;
    { py::gil_scoped_release nogil; idx = topk_select(d, n, k); }
    return to_numpy(std::move(idx));
  }, py::arg("x"), py::arg("k"), "Sorted indices of the k largest |x|.");

  m.def("randomk_indices", [](uint64_t seed, uint64_t n, uint64_t k) {
    if (k < 1 || k > n) fail("random-k needs 1 <= k <= n, got k=" + std::to_string(k) + ", n=" + std::to_string(n));
    if (n > 0xffffffffull) fail("random-k supports tensors of fewer than 2^32 elements");
    Indices idx(k);
    { py::gil_scoped_release nogil; randomk_indices(seed, n, k, idx.data()); }
    return to_numpy(std::move(idx));
  }, py::arg("seed"), py::arg("n"), py::arg("k"), "The k sorted indices a random-k packet with this seed uses.");
  m.def("derive_seed", &derive_seed, py::arg("seed"), py::arg("step"));

  auto matrix = [](const py::array& a, const char* what) {
    if (a.ndim() != 2) fail(std::string(what) + " must be 2-D");
    return std::make_tuple(f32_data(a, what), static_cast<size_t>(a.shape(0)), static_cast<size_t>(a.shape(1)));
  };
  m.def("lowrank_mq", [matrix](const py::array& M, const py::array& Q) {
    auto [pm, n, mm] = matrix(M, "M");
    auto [pq, mq, r] = matrix(Q, "Q");
    if (mq != mm) fail("M is n x m and Q must be m x r");
    F32Array P({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(r)});
    float* pp = P.mutable_data();
    { py::gil_scoped_release nogil; lowrank_mq(pm, n, mm, pq, r, pp); }
    return P;
  }, py::arg("M"), py::arg("Q"), "P = M @ Q, reading M once.");
  m.def("lowrank_mtp", [matrix](const py::array& M, const py::array& P) {
    auto [pm, n, mm] = matrix(M, "M");
    auto [pp, np_, r] = matrix(P, "P");
    if (np_ != n) fail("M is n x m and P must be n x r");
    F32Array Q({static_cast<py::ssize_t>(mm), static_cast<py::ssize_t>(r)});
    float* pq = Q.mutable_data();
    { py::gil_scoped_release nogil; lowrank_mtp(pm, n, mm, pp, r, pq); }
    return Q;
  }, py::arg("M"), py::arg("P"), "Q = M.T @ P, reading M once.");
  m.def("orthonormalize", [matrix](py::array P) {
    auto [pp, n, r] = matrix(P, "P");
    (void)pp;
    float* d = f32_mut(P, "P");
    Floats work(d, d + n * r);  // the caller's array is not written while the GIL is released
    { py::gil_scoped_release nogil; orthonormalize_columns(work.data(), n, r); }
    std::memcpy(f32_mut(P, "P"), work.data(), work.size() * sizeof(float));
    return P;
  }, py::arg("P"), "Orthonormalises the columns of P in place (Gram-Schmidt) and returns it.");
}
