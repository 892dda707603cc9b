// CPU kernels of the noise stream: `uniforms` (the op every backend must match bit for bit) and
// `philox4x32` (raw Philox on arbitrary counters and keys, for the Random123 known answers).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "blocks.h"
#include "npn/philox.h"
#include "npn_cpu.h"

namespace npn::cpu {

uint64_t read_u64_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong, name,
              ": expected one int64 element, got dtype ", t.scalar_type(), " and shape ",
              t.sizes());
  // a CPU scalar is read in place: item() dispatches two ops (~1 us), and a layer call reads
  // its seed and offset in several kernels
  if (t.is_cpu()) return static_cast<uint64_t>(*t.const_data_ptr<int64_t>());
  return static_cast<uint64_t>(t.item<int64_t>());
}

double read_scalar(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.numel() == 1);
  if (t.is_cpu() && t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
  if (t.is_cpu() && t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  return t.item<double>();
}

// out [n] float32, contiguous; element i = uniform_at(seed, offset, i).
void uniforms(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.is_cpu(),
              "out: expected a contiguous float32 CPU tensor, got ", out.scalar_type(), " on ",
              out.device());
  const uint64_t s = read_u64_scalar(seed, "seed");
  const uint64_t o = read_u64_scalar(offset, "offset");
  const int64_t n = out.numel();
  float* p = out.data_ptr<float>();
  // The gate kernels' 64-element Philox blocks (vectorized): ~0.7 ns per value on one core, so
  // 512 blocks (~23 us) per task keep the OpenMP overhead (~5 us per region) small.
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, 512, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * kBlock;
      block_uniforms(s, o, i0, std::min(kBlock, n - i0), p + i0);
    }
  });
}

// counters [N, 4] and keys [N, 2], int64 holding uint32 values -> [N, 4] int64 words.
at::Tensor philox4x32(const at::Tensor& counters, const at::Tensor& keys) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4 && counters.scalar_type() == at::kLong,
              "counters: expected int64 [N, 4], got ", counters.scalar_type(), " ",
              counters.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 2 && keys.size(0) == counters.size(0) &&
                  keys.scalar_type() == at::kLong,
              "keys: expected int64 [N, 2] with N = ", counters.size(0), ", got ",
              keys.scalar_type(), " ", keys.sizes());
  const at::Tensor c = counters.contiguous();
  const at::Tensor k = keys.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    const int64_t* ci = cp + 4 * i;
    const Philox4 r = philox4x32_10(
        static_cast<uint32_t>(ci[0]), static_cast<uint32_t>(ci[1]), static_cast<uint32_t>(ci[2]),
        static_cast<uint32_t>(ci[3]), static_cast<uint32_t>(kp[2 * i]),
        static_cast<uint32_t>(kp[2 * i + 1]));
    for (int w = 0; w < 4; ++w) op[4 * i + w] = static_cast<int64_t>(r.w[w]);
  }
  return out;
}

}  // namespace npn::cpu
