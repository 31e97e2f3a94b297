// PowerSGD kernels on row-major float32 matrices.
//
// M is n x m, Q is m x r, P is n x r. Each product reads M exactly once from
// memory, so both are bound by memory bandwidth for the small ranks PowerSGD
// uses.
#pragma once
#include <cstddef>

namespace pysim {

// P = M Q.
void lowrank_mq(const float* M, size_t n, size_t m, const float* Q, size_t r, float* P);
// Q = M^T P.
void lowrank_mtp(const float* M, size_t n, size_t m, const float* P, size_t r, float* Q);
// Orthonormalises the r columns of P (n x r) in place by modified Gram-Schmidt;
// a column that is (numerically) zero after projection becomes zero.
void orthonormalize_columns(float* P, size_t n, size_t r);
// out (n x m) = P Q^T.
void lowrank_expand(const float* P, size_t n, const float* Q, size_t m, size_t r, float* out);

}  // namespace pysim
