// 2x2 max pooling with stride 2 over planes of float32, with the argmax of
// every window: what torch's max_pool2d(x, 2) computes on the CPU, bit for bit,
// without its NCHW kernel's cost (1.07 ms for the MNIST CNN's first pooling of a
// batch of 32 on one thread, 16x this kernel's; bench/kernels.py).
//
// The rule is torch's (aten/src/ATen/native/cpu/MaxPoolKernel.cpp, cpu_max_pool):
// scan a window row by row, starting from -inf and the window's first index;
// take a value that is greater than the maximum so far or is NaN. So ties go to
// the first value in scan order, a window of NaNs to its last NaN, a window of
// -inf to its first element. index is row * w + column within the plane (the
// format of max_pool2d_with_indices). A last odd row or column is left out
// (floor), as torch does without ceil_mode.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pysim {

// x: planes x h x w values; out and index: planes x (h/2) x (w/2).
void maxpool2x2(const float* x, size_t planes, size_t h, size_t w, float* out, int64_t* index);

}  // namespace pysim
