#include "lowrank.hpp"

#include <cmath>
#include <vector>

#include "parallel.hpp"

namespace pysim {
namespace {

constexpr size_t kLanes = 16;
constexpr size_t kMinRowsPerThread = 64;

// Transposes a (rows x cols) row-major matrix into (cols x rows).
std::vector<float> transpose(const float* a, size_t rows, size_t cols) {
  std::vector<float> t(rows * cols);
  for (size_t i = 0; i < rows; ++i)
    for (size_t j = 0; j < cols; ++j) t[j * rows + i] = a[i * cols + j];
  return t;
}

inline float dot(const float* a, const float* b, size_t m) {
  float acc[kLanes] = {};
  size_t j = 0;
  for (; j + kLanes <= m; j += kLanes)
    for (size_t l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  float s = 0;
  for (size_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < m; ++j) s += a[j] * b[j];
  return s;
}

// Two rows of M against all R columns of Q^T at once: each element of M is
// loaded once and used R times from registers.
template <size_t R>
void mq_two_rows(const float* a0, const float* a1, const float* qt, size_t m, float* p0, float* p1) {
  float acc0[R][kLanes] = {}, acc1[R][kLanes] = {};
  size_t j = 0;
  for (; j + kLanes <= m; j += kLanes)
    for (size_t c = 0; c < R; ++c)
      for (size_t l = 0; l < kLanes; ++l) {
        const float b = qt[c * m + j + l];
        acc0[c][l] += a0[j + l] * b;
        acc1[c][l] += a1[j + l] * b;
      }
  for (size_t c = 0; c < R; ++c) {
    float s0 = 0, s1 = 0;
    for (size_t l = 0; l < kLanes; ++l) { s0 += acc0[c][l]; s1 += acc1[c][l]; }
    for (size_t jj = j; jj < m; ++jj) { s0 += a0[jj] * qt[c * m + jj]; s1 += a1[jj] * qt[c * m + jj]; }
    p0[c] = s0;
    p1[c] = s1;
  }
}

// Rows [b, e) of P = M Q for a compile-time rank chunk of R columns starting at c0.
template <size_t R>
void mq_block(const float* M, size_t m, const float* qt, size_t r, size_t c0, size_t b, size_t e, float* P) {
  float tmp0[R], tmp1[R];
  size_t i = b;
  for (; i + 2 <= e; i += 2) {
    mq_two_rows<R>(M + i * m, M + (i + 1) * m, qt + c0 * m, m, tmp0, tmp1);
    for (size_t c = 0; c < R; ++c) { P[i * r + c0 + c] = tmp0[c]; P[(i + 1) * r + c0 + c] = tmp1[c]; }
  }
  for (; i < e; ++i) {
    mq_two_rows<R>(M + i * m, M + i * m, qt + c0 * m, m, tmp0, tmp1);
    for (size_t c = 0; c < R; ++c) P[i * r + c0 + c] = tmp0[c];
  }
}

}  // namespace

void lowrank_mq(const float* M, size_t n, size_t m, const float* Q, size_t r, float* P) {
  const std::vector<float> Qt = transpose(Q, m, r);  // r x m, contiguous per column of Q
  parallel_for(n, kMinRowsPerThread, [&](size_t, size_t b, size_t e) {
    // Ranks are handled in chunks of 4 (then 2, then 1) so accumulators stay in registers.
    size_t c0 = 0;
    for (; c0 + 4 <= r; c0 += 4) mq_block<4>(M, m, Qt.data(), r, c0, b, e, P);
    for (; c0 + 2 <= r; c0 += 2) mq_block<2>(M, m, Qt.data(), r, c0, b, e, P);
    for (; c0 < r; ++c0) mq_block<1>(M, m, Qt.data(), r, c0, b, e, P);
  });
}

void lowrank_mtp(const float* M, size_t n, size_t m, const float* P, size_t r, float* Q) {
  // Each thread accumulates Q^T (r x m) over its rows of M; partials are summed.
  const size_t parts = parts_for(n, kMinRowsPerThread);
  std::vector<std::vector<float>> partial(parts);
  parallel_parts(n, parts, [&](size_t t, size_t b, size_t e) {
    std::vector<float>& qt = partial[t];
    qt.assign(r * m, 0.0f);
    // Columns in blocks so the slice of Q^T being updated stays in L1; rows in
    // fours so each load/store of Q^T serves four rows of M.
    constexpr size_t kCols = 1024;
    for (size_t j0 = 0; j0 < m; j0 += kCols) {
      const size_t j1 = std::min(m, j0 + kCols);
      size_t i = b;
      for (; i + 4 <= e; i += 4) {
        const float* a0 = M + i * m;
        const float* a1 = a0 + m;
        const float* a2 = a1 + m;
        const float* a3 = a2 + m;
        for (size_t c = 0; c < r; ++c) {
          const float p0 = P[i * r + c], p1 = P[(i + 1) * r + c], p2 = P[(i + 2) * r + c], p3 = P[(i + 3) * r + c];
          float* q = qt.data() + c * m;
          for (size_t j = j0; j < j1; ++j) q[j] += p0 * a0[j] + p1 * a1[j] + p2 * a2[j] + p3 * a3[j];
        }
      }
      for (; i < e; ++i) {
        const float* row = M + i * m;
        for (size_t c = 0; c < r; ++c) {
          const float p = P[i * r + c];
          float* q = qt.data() + c * m;
          for (size_t j = j0; j < j1; ++j) q[j] += p * row[j];
        }
      }
    }
  });
  for (size_t t = 1; t < parts; ++t)
    for (size_t x = 0; x < r * m; ++x) partial[0][x] += partial[t][x];
  const std::vector<float>& qt = partial[0];
  for (size_t j = 0; j < m; ++j)
    for (size_t c = 0; c < r; ++c) Q[j * r + c] = qt[c * m + j];
}

void orthonormalize_columns(float* P, size_t n, size_t r) {
  std::vector<float> cols = transpose(P, n, r);  // r x n
  for (size_t c = 0; c < r; ++c) {
    float* v = cols.data() + c * n;
    for (size_t d = 0; d < c; ++d) {
      const float* u = cols.data() + d * n;
      const float proj = dot(v, u, n);
      for (size_t i = 0; i < n; ++i) v[i] -= proj * u[i];
    }
    const float norm = std::sqrt(dot(v, v, n));
    const float inv = norm > 1e-30f ? 1.0f / norm : 0.0f;
    for (size_t i = 0; i < n; ++i) v[i] *= inv;
  }
  for (size_t i = 0; i < n; ++i)
    for (size_t c = 0; c < r; ++c) P[i * r + c] = cols[c * n + i];
}

void lowrank_expand(const float* P, size_t n, const float* Q, size_t m, size_t r, float* out) {
  const std::vector<float> Qt = transpose(Q, m, r);
  parallel_for(n, kMinRowsPerThread, [&](size_t, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      float* row = out + i * m;
      for (size_t j = 0; j < m; ++j) row[j] = 0.0f;
      for (size_t c = 0; c < r; ++c) {
        const float p = P[i * r + c];
        const float* q = Qt.data() + c * m;
        for (size_t j = 0; j < m; ++j) row[j] += p * q[j];
      }
    }
  });
}

}  // namespace pysim
