// pysim._C: the compression core, operating on NumPy-compatible buffers so the
// extension builds without torch. Errors in input or packets raise ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <thread>

#include "codecs.hpp"
#include "elias_fano.hpp"
#include "lowrank.hpp"
#include "parallel.hpp"
#include "randomk.hpp"
#include "topk.hpp"

namespace py = pybind11;
using namespace pysim;

namespace pysim {
static int g_threads = std::max(1, std::min(8, static_cast<int>(std::thread::hardware_concurrency())));
int num_threads() { return g_threads; }
void set_num_threads(int n) {
  if (n < 1) fail("number of threads must be >= 1, got " + std::to_string(n));
  g_threads = n;
}
}  // namespace pysim

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

std::pair<const uint8_t*, size_t> bytes_of(const py::buffer& b) {
  py::buffer_info info = b.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.ndim == 1 && info.strides[0] != 1))
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
  static const char* codecs[] = {"dense", "topk", "randomk", "lowrank"};
  py::dict d;
  d["codec"] = codecs[static_cast<int>(h.codec)];
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
  d["index_code"] = static_cast<int>(h.flags);
  return d;
}

Header parse(const py::buffer& packet) {
  auto [p, n] = bytes_of(packet);
  return parse_packet(p, n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pysim compression core: codecs, wire format and kernels (C++17).";

  m.def("set_num_threads", &pysim::set_num_threads, py::arg("n"),
        "Threads the kernels may use for large inputs (default: min(8, cores)).");
  m.def("get_num_threads", &pysim::num_threads);

  m.def("header_bytes", [](int codec, size_t ndim) {
    if (codec < 0 || codec > 3) fail("unknown codec id");
    return header_bytes(static_cast<Codec>(codec), ndim);
  }, py::arg("codec"), py::arg("ndim"), "Header size in bytes for a codec id and tensor rank.");
  m.def("dense_payload_bytes", [](uint64_t n, int d) { return dense_payload_bytes(n, dtype_from_int(d)); });
  m.def("topk_payload_bytes", [](uint64_t n, uint64_t k, int d, int code) {
    return topk_payload_bytes(n, k, dtype_from_int(d), static_cast<IndexCode>(code));
  });
  m.def("randomk_payload_bytes", [](uint64_t k, int d) { return randomk_payload_bytes(k, dtype_from_int(d)); });
  m.def("lowrank_payload_bytes", [](uint64_t rows, uint64_t cols, uint64_t rank, int d) {
    return lowrank_payload_bytes(rows, cols, rank, dtype_from_int(d));
  });
  m.def("elias_fano_bytes", &elias_fano_bytes, py::arg("n"), py::arg("k"));
  m.def("crc32c", [](const py::buffer& b) { auto [p, n] = bytes_of(b); return crc32c(p, n); });

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
    float* qd = f32_mut(q, "warm-start Q");
    const uint32_t rank = static_cast<uint32_t>(q.shape(1));
    Bytes out;
    { py::gil_scoped_release nogil; out = pack_lowrank(t, rows, rank, qd, d); }
    return to_numpy(std::move(out));
  }, py::arg("x"), py::arg("shape"), py::arg("source_dtype"), py::arg("rows"), py::arg("q"), py::arg("value_dtype"),
     "One PowerSGD round; q (cols x rank, float32) is updated in place to the new Q.");

  m.def("parse_header", [](const py::buffer& packet) { return header_dict(parse(packet)); },
        py::arg("packet"), "Validates a packet (size, checksum) and returns its header as a dict.");

  m.def("unpack", [](const py::buffer& packet) {
    auto [p, n] = bytes_of(packet);
    Floats out;
    Header h;
    { py::gil_scoped_release nogil; h = parse_packet(p, n); out = unpack_dense(p, h); }
    return py::make_tuple(header_dict(h), to_numpy(std::move(out)));
  }, py::arg("packet"), "Decodes any packet to (header, flat float32 array).");

  m.def("unpack_sparse", [](const py::buffer& packet) {
    auto [p, n] = bytes_of(packet);
    std::vector<uint32_t> idx;
    std::vector<float> val;
    Header h;
    { py::gil_scoped_release nogil; h = parse_packet(p, n); unpack_sparse(p, h, idx, val); }
    return py::make_tuple(header_dict(h), to_numpy(std::move(idx)), to_numpy(std::move(val)));
  }, py::arg("packet"), "Decodes a top-k or random-k packet to (header, indices uint32, values float32).");

  m.def("unpack_factors", [](const py::buffer& packet) {
    auto [p, n] = bytes_of(packet);
    std::vector<float> P, Q;
    Header h;
    { py::gil_scoped_release nogil; h = parse_packet(p, n); unpack_factors(p, h, P, Q); }
    const py::ssize_t rows = h.rows, rank = h.rank, cols = static_cast<py::ssize_t>(h.numel / h.rows);
    return py::make_tuple(header_dict(h), to_numpy(std::move(P)).reshape({rows, rank}), to_numpy(std::move(Q)).reshape({cols, rank}));
  }, py::arg("packet"), "Decodes a low-rank packet to (header, P rows x rank, Q cols x rank).");

  m.def("topk_select", [](const py::array& x, uint64_t k) {
    const float* d = f32_data(x, "x");
    const size_t n = static_cast<size_t>(x.size());
    std::vector<uint32_t> idx;
    { py::gil_scoped_release nogil; idx = topk_select(d, n, k); }
    return to_numpy(std::move(idx));
  }, py::arg("x"), py::arg("k"), "Sorted indices of the k largest |x|.");

  m.def("randomk_indices", [](uint64_t seed, uint64_t n, uint64_t k) {
    std::vector<uint32_t> idx(k);
    if (k < 1 || k > n) fail("random-k needs 1 <= k <= n, got k=" + std::to_string(k) + ", n=" + std::to_string(n));
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
    { py::gil_scoped_release nogil; orthonormalize_columns(d, n, r); }
    return P;
  }, py::arg("P"), "Orthonormalises the columns of P in place (Gram-Schmidt) and returns it.");
  m.def("lowrank_expand", [matrix](const py::array& P, const py::array& Q) {
    auto [pp, n, r] = matrix(P, "P");
    auto [pq, mm, rq] = matrix(Q, "Q");
    if (rq != r) fail("P and Q must have the same rank");
    F32Array out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(mm)});
    float* po = out.mutable_data();
    { py::gil_scoped_release nogil; lowrank_expand(pp, n, pq, mm, r, po); }
    return out;
  }, py::arg("P"), py::arg("Q"), "P @ Q.T.");
}
