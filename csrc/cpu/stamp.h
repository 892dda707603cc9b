// TensorStamp: whether a tensor seen later is the one stamped, unmodified by torch since. Shared
// by the workspace's record of its W ⊙ z (gated_linear.cpp) and the record of the objective's
// doubled batch (paired.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace npn::cpu {

struct TensorStamp {
  // a weak reference: a storage freed and allocated again (perhaps at the same address) cannot
  // pass for the stamped one, as the StorageImpl is not reused while the reference lives
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  const void* data = nullptr;
  int64_t numel = 0, version = -1;

  void set(const at::Tensor& t) {
    storage = t.storage().getWeakStorageImpl();
    data = t.const_data_ptr();
    numel = t.numel();
    version = t._version();
  }

  void clear() { storage.reset(); }

  // t's storage, data pointer and size are the stamped ones, and its version has not moved (an
  // in-place write through torch moves it; one through .data or NumPy does not)
  bool matches(const at::Tensor& t) const {
    return storage.has_value() &&
           storage->_unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
           t.const_data_ptr() == data && t.numel() == numel && t._version() == version;
  }
};

}  // namespace npn::cpu
