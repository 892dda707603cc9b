// Facts about the build that `npn info` and the tests check: compiler, OpenMP, thread use.
#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "npn_cpu.h"

namespace npn::cpu {

std::string build_info() {
  std::string s = "compiler=";
#if defined(__clang__)
  s += "clang " __clang_version__;
#elif defined(__GNUC__)
  s += "gcc " __VERSION__;
#else
  s += "unknown";
#endif
#if defined(_OPENMP)
  s += "; openmp=" + std::to_string(_OPENMP);
#else
  s += "; openmp=no";
#endif
#if defined(__AVX512F__)
  s += "; simd=avx512";
#elif defined(__AVX2__)
  s += "; simd=avx2";
#else
  s += "; simd=baseline";
#endif
#if defined(NPN_WITH_CUDA)
  s += "; cuda=yes";
#else
  s += "; cuda=no";
#endif
  return s;
}

// Runs n tasks of ~2 ms through at::parallel_for and returns how many distinct threads ran them.
// Without -fopenmp in both compile and link flags ATen's parallel_for silently runs on 1.
int64_t parallel_threads(int64_t n) {
  std::mutex mu;
  std::set<int> seen;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    std::lock_guard<std::mutex> lock(mu);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace npn::cpu
