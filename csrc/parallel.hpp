// A minimal fork-join helper. pysim's kernels run with the GIL released and
// use their own short-lived threads only when the work is large enough to pay
// for them; torch's intra-op pool is idle while a kernel runs, so the two do
// not compete.
#pragma once
#include <algorithm>
#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace pysim {

int num_threads();
void set_num_threads(int n);

// Calls fn(t, begin, end) for t in [0, parts) over [0, n) split evenly; part 0
// runs on the calling thread. parts is clamped so that each part holds at
// least min_per_part items.
template <typename Fn>
void parallel_for(size_t n, size_t min_per_part, Fn&& fn) {
  size_t parts = std::max<size_t>(1, std::min<size_t>(num_threads(), n / std::max<size_t>(1, min_per_part)));
  if (parts == 1) { fn(size_t{0}, size_t{0}, n); return; }
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(parts);
  auto run = [&](size_t t) {
    try { fn(t, n * t / parts, n * (t + 1) / parts); } catch (...) { errors[t] = std::current_exception(); }
  };
  for (size_t t = 1; t < parts; ++t) threads.emplace_back(run, t);
  run(0);
  for (auto& th : threads) th.join();
  for (auto& e : errors) if (e) std::rethrow_exception(e);
}

inline size_t parts_for(size_t n, size_t min_per_part) {
  return std::max<size_t>(1, std::min<size_t>(num_threads(), n / std::max<size_t>(1, min_per_part)));
}

}  // namespace pysim
