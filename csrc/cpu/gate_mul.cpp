// CPU kernels of gate application (DESIGN 4.2): out = a * z for a [R, P, C] and the gates z of
// phi [P], and its backward, without a noise tensor: each block's noise is drawn (forward) or
// regenerated (backward) next to the loop that uses it. The gate of (r, p) uses noise element
// r P + p (example noise) or p (batch noise; evaluation draws none).
//
// Two layouts (blocks.h: 64 gates per block):
// - flat: blocks of the R P gates in row-major order, each streaming its 64 C elements. Used
//   whenever grad_phi needs no sum over rows: the forward, a backward without grad_phi, and
//   R = 1 (weight gates [1, N K, 1]: Philox + gate + product in one pass, and in backward one
//   pass writing grad_a, grad_phi and a_gated).
// - chunked: grad_phi with R > 1. Tasks are (row chunk, unit block); each sums its rows into its
//   own partial [P], and a last pass adds the partials in chunk order.
// Gates shared by R > 1 rows are computed once into a [P] buffer, then streamed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "dispatch.h"
#include "npn/gates.h"
#include "npn_cpu.h"

namespace npn::cpu {

namespace {

// grad_phi sums rows in at most 16 fixed chunks (then partials in chunk order): the result does
// not depend on the thread count, and 16 tasks per unit block keep 16 cores busy at P <= 64.
constexpr int64_t kRowChunks = 16;
// Grain in elements of a task that only streams (gates from the buffer): ~0.03 us per 64 float
// elements against ~0.2 us for a block of HardConcrete gates, so 8x kGrainNoise blocks' worth.
constexpr int64_t kGrainStream = 8 * kGrainNoise * kBlock;


// One instantiation per (family, training, antithetic), called once per 64 gates: an indirect
// call there costs nothing next to the block, and keeps the [a dtype x phi dtype] drivers few.
template <typename T, typename Phi>
using BlockGatesFn = void (*)(const GateSource<T>&, int64_t, int64_t, const Phi*, T*, T*);

template <typename T, typename Phi>
BlockGatesFn<T, Phi> pick_block_gates(int64_t family, bool training, bool antithetic) {
  if (family == kHardConcrete) {
    return training ? &block_gates<T, Phi, kHardConcrete, true, false>
                    : &block_gates<T, Phi, kHardConcrete, false, false>;
  }
  if (!training) return &block_gates<T, Phi, kBinary, false, false>;
  return antithetic ? &block_gates<T, Phi, kBinary, true, true>
                    : &block_gates<T, Phi, kBinary, true, false>;
}

// sum_c x[c] y[c] in M, in kLanes partial sums (fixed order: deterministic).
template <typename M, typename A>
M dot(const A* x, const A* y, int64_t n) {
  M lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += static_cast<M>(x[c + l]) * static_cast<M>(y[c + l]);
    }
  }
  M s = M(0);
  for (; c < n; ++c) s += static_cast<M>(x[c]) * static_cast<M>(y[c]);
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// out[c] = x[c] * z in M, rounded to A; out may alias x (in place).
template <typename M, typename A>
void scale(const A* x, M z, A* out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<A>(static_cast<M>(x[c]) * z);
}

// len <= 64 gates z[k] of [len, C] elements a, grad: grad_a = grad * z and out = a * z where
// non-null (out may alias a), and rowsum[k] = sum_c grad a (where non-null, read first).
template <typename M, typename A, typename T>
void stream_block(const A* a, const A* grad, A* out, A* grad_a, const T* z, int64_t len,
                  int64_t cols, M* rowsum) {
  M zm[kBlock];
  for (int64_t k = 0; k < len; ++k) zm[k] = static_cast<M>(z[k]);
  if (cols == 1) {  // weight gates and Linear "in"/"out" gates: vectorize over the gates
    if (rowsum != nullptr) {
      for (int64_t k = 0; k < len; ++k) rowsum[k] = static_cast<M>(grad[k]) * static_cast<M>(a[k]);
    }
    if (grad_a != nullptr) {
      for (int64_t k = 0; k < len; ++k) grad_a[k] = static_cast<A>(static_cast<M>(grad[k]) * zm[k]);
    }
    if (out != nullptr) {
      for (int64_t k = 0; k < len; ++k) out[k] = static_cast<A>(static_cast<M>(a[k]) * zm[k]);
    }
    return;
  }
  for (int64_t k = 0; k < len; ++k) {  // one gate's C elements at a time stay in L1
    const int64_t e = k * cols;
    if (rowsum != nullptr) rowsum[k] = dot<M>(grad + e, a + e, cols);
    if (grad_a != nullptr) scale(grad + e, zm[k], grad_a + e, cols);
    if (out != nullptr) scale(a + e, zm[k], out + e, cols);
  }
}

// Pointers and sizes of one gate_mul or gate_mul_backward call; outputs are nullptr when not
// wanted. Forward: out only. a, grad, out, grad_a: [R, P, C]; phi, grad_phi: [P].
template <typename A, typename Phi>
struct GateMulIo {
  const A* a;
  const A* grad;
  const Phi* phi;
  A* out;
  A* grad_a;
  Phi* grad_phi;
  int64_t rows, units, cols;
};

// grad_phi[k] = acc[k] * dz[k] in T, or acc[k] itself where dz is nullptr (a sum of products
// with each row's own dz: example noise).
template <typename Phi, typename T, typename M>
void finish_grad_phi(const M* acc, const T* dz, int64_t len, Phi* grad_phi) {
  if (dz == nullptr) {
    for (int64_t k = 0; k < len; ++k) grad_phi[k] = static_cast<Phi>(acc[k]);
    return;
  }
  for (int64_t k = 0; k < len; ++k) grad_phi[k] = static_cast<Phi>(static_cast<T>(acc[k]) * dz[k]);
}

template <typename A, typename Phi>
void gate_mul_kernel(const GateMulIo<A, Phi>& io, const GateSource<at::opmath_type<Phi>>& src,
                     BlockGatesFn<at::opmath_type<Phi>, Phi> gates, bool row_noise) {
  using T = at::opmath_type<Phi>;
  using M = ProductMath<A, Phi>;
  const int64_t R = io.rows, P = io.units, C = io.cols;
  const bool want_dz = io.grad_phi != nullptr;
  const bool shared = !row_noise && R > 1;
  const int64_t unit_blocks = (P + kBlock - 1) / kBlock;

  // Gates shared by R > 1 rows: once per unit. zbuf, dzbuf [P].
  std::vector<T> zbuf(shared ? P : 0);
  std::vector<T> dzbuf(shared && want_dz ? P : 0);
  if (shared) {
    at::parallel_for(0, unit_blocks, kGrainNoise, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t p0 = b * kBlock;
        gates(src, p0, std::min(kBlock, P - p0), io.phi + p0, zbuf.data() + p0,
              want_dz ? dzbuf.data() + p0 : nullptr);
      }
    });
  }

  if (!want_dz || R == 1) {  // flat layout: blocks of the R P gates
    const int64_t blocks = (R * P + kBlock - 1) / kBlock;
    const int64_t grain = std::max<int64_t>(1, (shared ? kGrainStream : kGrainNoise * kBlock) /
                                                   (kBlock * C));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      T zb[kBlock], dzb[kBlock];
      Phi xw[kBlock];
      M rowsum[kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlock;
        const int64_t len = std::min(kBlock, R * P - i0);
        const int64_t p0 = i0 % P;
        const bool wraps = p0 + len > P;  // the block crosses a row: gather by p = i % P
        const T* z = zb;
        if (shared) {
          if (wraps) {
            for (int64_t k = 0; k < len; ++k) zb[k] = zbuf[(p0 + k) % P];
          } else {
            z = zbuf.data() + p0;
          }
        } else {
          const Phi* x = io.phi + p0;
          if (wraps) {
            for (int64_t k = 0; k < len; ++k) xw[k] = io.phi[(p0 + k) % P];
            x = xw;
          }
          gates(src, i0, len, x, zb, want_dz ? dzb : nullptr);
        }
        const int64_t e = i0 * C;
        stream_block<M>(io.a + e, io.grad == nullptr ? nullptr : io.grad + e,
                        io.out == nullptr ? nullptr : io.out + e,
                        io.grad_a == nullptr ? nullptr : io.grad_a + e, z, len, C,
                        want_dz ? rowsum : nullptr);
        if (want_dz) finish_grad_phi(rowsum, dzb, len, io.grad_phi + p0);  // R = 1: no sum
      }
    });
    return;
  }

  // Chunked layout: tasks (row chunk, unit block); partial [chunks, P].
  const int64_t chunks = std::min(R, kRowChunks);
  const int64_t chunk_rows = (R + chunks - 1) / chunks;
  std::vector<M> partial(chunks * P);
  const int64_t grain = std::max<int64_t>(1, kGrainNoise / (chunk_rows * C));
  at::parallel_for(0, chunks * unit_blocks, grain, [&](int64_t t0, int64_t t1) {
    T zb[kBlock], dzb[kBlock];
    M rowsum[kBlock], acc[kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / unit_blocks;
      const int64_t p0 = (t % unit_blocks) * kBlock;
      const int64_t len = std::min(kBlock, P - p0);
      const T* z = shared ? zbuf.data() + p0 : zb;
      const T* dz = shared ? dzbuf.data() + p0 : dzb;
      std::fill(acc, acc + len, M(0));
      for (int64_t r = chunk * R / chunks; r < (chunk + 1) * R / chunks; ++r) {
        if (!shared) gates(src, r * P + p0, len, io.phi + p0, zb, dzb);
        const int64_t e = (r * P + p0) * C;
        stream_block<M>(io.a + e, io.grad + e, io.out == nullptr ? nullptr : io.out + e,
                        io.grad_a == nullptr ? nullptr : io.grad_a + e, z, len, C, rowsum);
        if (row_noise) {
          for (int64_t k = 0; k < len; ++k) {
            acc[k] += static_cast<M>(static_cast<T>(rowsum[k]) * dz[k]);
          }
        } else {
          for (int64_t k = 0; k < len; ++k) acc[k] += rowsum[k];
        }
      }
      std::copy(acc, acc + len, partial.data() + chunk * P + p0);
    }
  });
  at::parallel_for(0, unit_blocks, kGrainNoise, [&](int64_t b0, int64_t b1) {
    M acc[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * kBlock;
      const int64_t len = std::min(kBlock, P - p0);
      std::fill(acc, acc + len, M(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const M* part = partial.data() + chunk * P + p0;
        for (int64_t k = 0; k < len; ++k) acc[k] += part[k];
      }
      finish_grad_phi(acc, shared ? dzbuf.data() + p0 : nullptr, len, io.grad_phi + p0);
    }
  });
}

// a [R, P, C] and phi [P]: contiguous floating-point CPU tensors.
void check_inputs(const at::Tensor& a, const at::Tensor& phi) {
  TORCH_CHECK(a.is_cpu() && a.is_contiguous() && a.dim() == 3 && is_float_dtype(a.scalar_type()),
              "a: expected a contiguous [R, P, C] CPU tensor of dtype float32, float64, float16 "
              "or bfloat16, got ",
              a.scalar_type(), " ", a.sizes(), a.is_contiguous() ? "" : " (non-contiguous)",
              " on ", a.device());
  TORCH_CHECK(phi.is_cpu() && phi.is_contiguous() && phi.dim() == 1 &&
                  phi.size(0) == a.size(1) && is_float_dtype(phi.scalar_type()),
              "phi: expected a contiguous [P] = [", a.size(1),
              "] CPU tensor of dtype float32, float64, float16 or bfloat16, got ",
              phi.scalar_type(), " ", phi.sizes(), phi.is_contiguous() ? "" : " (non-contiguous)",
              " on ", phi.device());
}

// t: contiguous CPU tensor of dtype and shape `like`'s.
void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == like.sizes(),
              name, ": expected a contiguous CPU tensor of dtype ", like.scalar_type(),
              " and shape ", like.sizes(), ", got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (non-contiguous)", " on ", t.device());
}

}  // namespace

void check_antithetic(int64_t family, bool training, bool antithetic) {
  TORCH_CHECK(!antithetic || (family == kBinary && training),
              "antithetic: expected false except for Binary gates (family 0) in training "
              "(ARM's z' = 1[u > 1 - pi]), got true with family ",
              family, training ? " in training" : " in evaluation");
}

// a [R, P, C], phi [P] -> out [R, P, C] (a's dtype; may be a itself).
void gate_mul(const at::Tensor& a, const at::Tensor& phi, const at::Tensor& seed,
              const at::Tensor& offset, int64_t family, c10::ArrayRef<double> params,
              bool training, bool example, bool antithetic, const at::Tensor& out) {
  check_inputs(a, phi);
  const GateSpec spec = parse_gate_spec(family, params);
  check_antithetic(family, training, antithetic);
  check_like(out, a, "out");
  const uint64_t s = read_u64_scalar(seed, "seed");
  const uint64_t o = read_u64_scalar(offset, "offset");
  if (a.numel() == 0) return;
  dispatch_pair(a, phi, [&](auto a_tag, auto phi_tag) {
    using A = decltype(a_tag);
    using Phi = decltype(phi_tag);
    using T = at::opmath_type<Phi>;
    const GateMulIo<A, Phi> io{a.const_data_ptr<A>(), nullptr, phi.const_data_ptr<Phi>(),
                               out.mutable_data_ptr<A>(), nullptr, nullptr,
                               a.size(0), a.size(1), a.size(2)};
    gate_mul_kernel(io, GateSource<T>{s, o, make_gate<T>(spec)},
                    pick_block_gates<T, Phi>(family, training, antithetic), training && example);
  });
}

// grad, a [R, P, C], phi [P] -> grad_a, a_gated [R, P, C] (a's dtype), grad_phi [P] (phi's).
void gate_mul_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& phi,
                       const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                       c10::ArrayRef<double> params, bool training, bool example,
                       const std::optional<at::Tensor>& grad_a,
                       const std::optional<at::Tensor>& grad_phi,
                       const std::optional<at::Tensor>& a_gated) {
  check_inputs(a, phi);
  const GateSpec spec = parse_gate_spec(family, params);
  check_like(grad, a, "grad");
  const at::Tensor* ga = optional_output(grad_a);
  const at::Tensor* gp = optional_output(grad_phi);
  const at::Tensor* ag = optional_output(a_gated);
  if (ga != nullptr) check_like(*ga, a, "grad_a");
  if (gp != nullptr) check_like(*gp, phi, "grad_phi");
  if (ag != nullptr) check_like(*ag, a, "a_gated");
  const uint64_t s = read_u64_scalar(seed, "seed");
  const uint64_t o = read_u64_scalar(offset, "offset");
  // Binary gates have no pathwise gradient; with R C = 0 grad_phi is a sum over nothing.
  const bool has_gp = gp != nullptr && family == kHardConcrete && a.numel() > 0;
  if (gp != nullptr && !has_gp) gp->zero_();
  if (a.numel() == 0 || (ga == nullptr && ag == nullptr && !has_gp)) return;
  dispatch_pair(a, phi, [&](auto a_tag, auto phi_tag) {
    using A = decltype(a_tag);
    using Phi = decltype(phi_tag);
    using T = at::opmath_type<Phi>;
    const GateMulIo<A, Phi> io{a.const_data_ptr<A>(), grad.const_data_ptr<A>(),
                               phi.const_data_ptr<Phi>(),
                               ag == nullptr ? nullptr : ag->mutable_data_ptr<A>(),
                               ga == nullptr ? nullptr : ga->mutable_data_ptr<A>(),
                               has_gp ? gp->mutable_data_ptr<Phi>() : nullptr,
                               a.size(0), a.size(1), a.size(2)};
    gate_mul_kernel(io, GateSource<T>{s, o, make_gate<T>(spec)},
                    pick_block_gates<T, Phi>(family, training, false), training && example);
  });
}

}  // namespace npn::cpu
