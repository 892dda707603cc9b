// dtype dispatch and argument helpers shared by the CPU kernels (gates.cpp, gate_mul.cpp,
// hc_gate_mul.cpp): an activation dtype A and a gate-parameter dtype Phi, each any float dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <type_traits>

namespace npn::cpu {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// An optional output of an op (Tensor? in the schema): its tensor, or nullptr when not wanted.
inline const at::Tensor* optional_output(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// 1 for a NaN or infinite v, else 0: v - v is NaN exactly then (branch-free, so the loops that
// count it while they read phi for other work still vectorize).
template <typename T>
inline int64_t not_finite(T v) {
  return (v - v == T(0)) ? 0 : 1;
}

// ValueError naming phi when `bad` of its n values are NaN or infinite.
inline void check_not_finite_count(int64_t bad, int64_t n) {
  TORCH_CHECK_VALUE(bad == 0, "phi: expected finite values, got ", bad, " NaN or infinite of ", n);
}

// Calls f(A{}, Phi{}) with a's and phi's scalar types.
template <typename Fn>
void dispatch_pair(const at::Tensor& a, const at::Tensor& phi, Fn&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phi.scalar_type(), "gate_mul", [&] {
    using Phi = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gate_mul", [&] {
      f(scalar_t{}, Phi{});
    });
  });
}

// The math type of a product a z: double if a or phi is double, else float.
template <typename A, typename Phi>
using ProductMath = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<Phi, double>, double,
                                       float>;

}  // namespace npn::cpu
