// A minimal fork-join helper. pysim's kernels run with the GIL released and
// use their own short-lived threads only when the work is large enough to pay
// for them; torch's intra-op pool is idle while a kernel runs, so the two do
// not compete.
#pragma once
#include <algorithm>
#include <cstddef>
#include <exception>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace pysim {

// Threads the kernels may use (an atomic: kernels read it with the GIL released).
int num_threads();
void set_num_threads(int n);

inline size_t parts_for(size_t n, size_t min_per_part) {
  return std::max<size_t>(1, std::min<size_t>(num_threads(), n / std::max<size_t>(1, min_per_part)));
}

// Calls fn(t, begin, end) for t in [0, parts) over [0, n) split evenly; part 0
// runs on the calling thread. If a thread cannot be created, its part and the
// rest run on the calling thread. Callers that keep per-part state size it
// with the same `parts` they pass here (num_threads() may change meanwhile).
template <typename Fn>
void parallel_parts(size_t n, size_t parts, Fn&& fn) {
  if (parts <= 1) { fn(size_t{0}, size_t{0}, n); return; }
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(parts);
  auto run = [&](size_t t) {
    try { fn(t, n * t / parts, n * (t + 1) / parts); } catch (...) { errors[t] = std::current_exception(); }
  };
  size_t started = 1;
  try {
    for (; started < parts; ++started) threads.emplace_back(run, started);
  } catch (const std::system_error&) {  // out of threads: do the remaining parts here
  }
  run(0);
  for (size_t t = started; t < parts; ++t) run(t);
  for (auto& th : threads) th.join();
  for (auto& e : errors) if (e) std::rethrow_exception(e);
}

// parallel_parts with parts = parts_for(n, min_per_part).
template <typename Fn>
void parallel_for(size_t n, size_t min_per_part, Fn&& fn) {
  parallel_parts(n, parts_for(n, min_per_part), std::forward<Fn>(fn));
}

}  // namespace pysim
