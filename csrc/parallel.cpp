#include "parallel.hpp"

#include <atomic>
#include <string>

#include "wire.hpp"

namespace pysim {
namespace {
std::atomic<int> g_threads{std::max(1, std::min(8, static_cast<int>(std::thread::hardware_concurrency())))};
}  // namespace

int num_threads() { return g_threads.load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  if (n < 1) fail("number of threads must be >= 1, got " + std::to_string(n));
  g_threads.store(n, std::memory_order_relaxed);
}

}  // namespace pysim
