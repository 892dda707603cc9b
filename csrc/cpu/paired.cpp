// Paired (ARM) batches in the C++ layer (gated_linear.cpp; DESIGN 4.3): the gates [z; z'] of a
// paired call together with the noise u they come from, and the helpers that treat a doubled
// batch [x; x'] by halves.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "blocks.h"
#include "dispatch.h"
#include "npn_cpu.h"
#include "stamp.h"

namespace npn::cpu {

// phi [P] contiguous (Binary gates in training) -> (u [P] float32, z [2, P] of dtype): the
// stream's noise u, z[0] = 1[u < pi] and z[1] = ARM's z' = 1[u > 1 − pi]. Both rows come from
// block_gates, the function sample_gates and gate_mul call, so they are the bits those kernels
// give. One call where the two gate vectors took six ATen calls, and u is what ARM's surrogate
// needs: npn.objective drew it a second time per layer before (~15 us each, row C4, 2026-11-25).
std::tuple<at::Tensor, at::Tensor> paired_gates(const at::Tensor& phi, const at::Tensor& seed,
                                                const at::Tensor& offset,
                                                c10::ArrayRef<double> params,
                                                at::ScalarType dtype) {
  TORCH_CHECK(phi.dim() == 1 && phi.is_contiguous() && is_float_dtype(phi.scalar_type()),
              "phi: expected a contiguous floating-point vector [P], got ", phi.scalar_type(), " ",
              phi.sizes());
  const GateSpec spec = parse_gate_spec(kBinary, params);
  const uint64_t s = read_u64_scalar(seed, "seed");
  const uint64_t o = read_u64_scalar(offset, "offset");
  const int64_t p = phi.numel();
  at::Tensor u = at::empty({p}, phi.options().dtype(at::kFloat));
  at::Tensor z = at::empty({2, p}, phi.options().dtype(dtype));
  dispatch_pair(z, phi, [&](auto a_tag, auto phi_tag) {
    using A = decltype(a_tag);
    using Phi = decltype(phi_tag);
    using T = at::opmath_type<Phi>;
    const GateSource<T> src{s, o, make_gate<T>(spec)};
    const Phi* x = phi.const_data_ptr<Phi>();
    float* up = u.mutable_data_ptr<float>();
    A* zp = z.mutable_data_ptr<A>();
    const int64_t blocks = (p + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, kGrainNoise, [&](int64_t b0, int64_t b1) {
      T zb[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t i0 = blk * kBlock;
        const int64_t len = std::min(kBlock, p - i0);
        block_uniforms(s, o, i0, len, up + i0);
        block_gates<T, Phi, kBinary, true, false>(src, i0, len, x + i0, zb, nullptr);
        for (int64_t k = 0; k < len; ++k) zp[i0 + k] = static_cast<A>(zb[k]);
        block_gates<T, Phi, kBinary, true, true>(src, i0, len, x + i0, zb, nullptr);
        for (int64_t k = 0; k < len; ++k) zp[p + i0 + k] = static_cast<A>(zb[k]);
      }
    });
  });
  return {u, z};
}

// out [R, K] = x [R, K] (contiguous) with its first m rows scaled by z[0] and the rest by z[1]
// (z [2, K] contiguous, x's dtype; [K] when m = R); out may be x. One pass: ATen's broadcast
// multiply of [2, m, K] by [2, 1, K] took 62 us for the 256x100 input of row C4's last layer
// (2026-11-25), ~20x this loop.
void scale_halves(const at::Tensor& x, const at::Tensor& z, int64_t m, const at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_halves", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // ~8K elements per task, both threads from 16K on: x's buffer was last read by the GEMM on
    // both threads, and one thread writing all of it waits on the other core's copies of its
    // lines (256x100 after a 2-thread GEMM: 11 us written by one thread, 4 us into a buffer the
    // GEMM had not read, 2026-11-25)
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{8} << 10) / std::max<int64_t>(1, k)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         const scalar_t* zr = zp + (r < m ? 0 : k);
                         const scalar_t* xr = xp + r * k;
                         scalar_t* orow = op + r * k;
                         for (int64_t j = 0; j < k; ++j) orow[j] = xr[j] * zr[j];
                       }
                     });
  });
}

// Rows per task of changed_units' gathers.
constexpr int64_t kGatherGrain = 32;

// (x1[:, C] ⊙ (z' − z)[C] [m, |C|], W[:, C] [N, |C|]) over the units C where z' ≠ z (z [2, K],
// x1 [m, K] and W [N, K] of one dtype): the operands of the correction that gives the second half
// of a paired batch whose halves are equal (gated_linear.cpp, paired_same_input). Undefined
// tensors when the correction would take more columns than the second half's own GEMM (|z'|
// gathered columns when fewer than compact_below·K are open, else K): where pi ≈ 0.5, z' ≈ 1 − z
// and C is nearly all units (row C4's MLP with every gate at pi = 0.5: 1.9× → 1.65× the dense
// step, 2026-11-25). Gathered in one parallel loop: the ATen chain (sub, nonzero, three
// index_selects, mul) was ~20 us of calls around ~10 us of copying for row C4's first layer
// (128x784, 2026-11-25).
std::tuple<at::Tensor, at::Tensor> changed_units(const at::Tensor& x1, const at::Tensor& w,
                                                 const at::Tensor& z, double compact_below) {
  const int64_t m = x1.size(0), k = x1.size(1), n = w.size(0);
  at::Tensor xd, wd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "changed_units", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    std::vector<int64_t> idx;
    std::vector<scalar_t> d;
    int64_t open = 0;  // |z'|
    for (int64_t j = 0; j < k; ++j) {
      open += static_cast<float>(zp[k + j]) != 0.0f;
      if (zp[k + j] != zp[j]) {
        idx.push_back(j);
        d.push_back(zp[k + j] - zp[j]);  // +-1: exact in every dtype
      }
    }
    if (static_cast<int64_t>(idx.size()) >= (gathers(open, k, compact_below) ? open : k)) return;
    const at::Tensor xc = x1.contiguous(), wc = w.contiguous();
    const auto c = static_cast<int64_t>(idx.size());
    xd = at::empty({m, c}, x1.options());
    wd = at::empty({n, c}, w.options());
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* xo = xd.mutable_data_ptr<scalar_t>();
    scalar_t* wo = wd.mutable_data_ptr<scalar_t>();
    // both gathers in one loop over the rows of x1 and then W, on both threads: each row reads
    // ~|C| scattered cache lines (all of W's 940 KB for row C4's first layer)
    at::parallel_for(0, m + n, kGatherGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (r < m) {
          for (int64_t j = 0; j < c; ++j) xo[r * c + j] = xp[r * k + idx[j]] * d[j];
        } else {
          const int64_t rw = r - m;
          for (int64_t j = 0; j < c; ++j) wo[rw * c + j] = wp[rw * k + idx[j]];
        }
      }
    });
  });
  return {xd, wd};
}

namespace {

// The batch [x; x] that doubled() built last on this thread.
TensorStamp& doubled_stamp() {
  thread_local TensorStamp stamp;
  return stamp;
}

}  // namespace

// x [B, ...] -> [x; x] [2B, ...] (npn.objective's paired batch), recorded so that same_halves
// knows its halves are equal without comparing them: the 800 KB memcmp of row C4's first layer
// (~15 us a step) is skipped.
at::Tensor doubled(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "x: expected a batch [B, ...], got a 0-dim tensor");
  at::Tensor y = at::cat({x, x});
  doubled_stamp().set(y);
  return y;
}

// Whether both halves of a paired batch x [2m, K] hold the same bits: the first gated layer of
// an ARM pass sees [x; x] itself. Bits, not values: equal bits give the same products, and
// memcmp reads the 400 KB of a 128x784 float32 half in ~15 us where at::equal took ~45 us.
bool same_halves(const at::Tensor& x, int64_t m) {
  // that batch, unmodified since, or a contiguous view of all of it: its halves are equal
  if (x.is_contiguous() && doubled_stamp().matches(x)) return true;
  if (!x.is_contiguous()) return at::equal(x.narrow(0, 0, m), x.narrow(0, m, m));
  const size_t half = static_cast<size_t>(m * x.size(1)) * x.element_size();
  const char* p = static_cast<const char*>(x.const_data_ptr());
  return std::memcmp(p, p + half, half) == 0;
}

}  // namespace npn::cpu
