// Caller-owned scratch memory, CUB style: ask for the size, then pass a buffer
// of at least that many bytes. Carving is the same on host and device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "error.hpp"

namespace pyramidinfer {

inline constexpr std::size_t kWorkspaceAlignment = 256;

inline constexpr std::size_t align_up(std::size_t n, std::size_t a = kWorkspaceAlignment) {
  return (n + a - 1) / a * a;
}

/// Sequentially hands out aligned pieces of one buffer. Run it once with a null
/// base to learn the total size, then with the real buffer.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base = nullptr, std::size_t capacity = 0)
      : base_(static_cast<char*>(base)), capacity_(capacity) {}

  template <class T>
  T* take(std::size_t count) {
    const std::size_t off = used_;
    used_ += align_up(count * sizeof(T));
    if (base_ == nullptr) return nullptr;
    if (used_ > capacity_)
      detail::throw_arg_error("WorkspaceCarver", "workspace_bytes", capacity_,
                              "is too small: need " + std::to_string(used_));
    return reinterpret_cast<T*>(base_ + off);
  }

  std::size_t bytes() const { return used_; }

 private:
  char* base_;
  std::size_t capacity_;
  std::size_t used_ = 0;
};

}  // namespace pyramidinfer
