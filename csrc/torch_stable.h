// The LibTorch stable ABI as csrc/ uses it, plus the few things it lacks.
//
// setup.py and CMakeLists.txt compile csrc/ with TORCH_TARGET_VERSION = 2.11: the binary then
// needs only what libtorch 2.11 exports, so one build loads on every torch >= 2.11. Under that
// flag the unstable torch headers (ATen, c10, torch/library.h) #error, so this header and the
// ones it includes are all csrc/ may use from torch.
#pragma once

// The shim declares its CUDA entry points (current stream, ...) only under USE_CUDA.
#if defined(__CUDACC__) && !defined(USE_CUDA)
#define USE_CUDA
#endif

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace pcl_ext {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using TensorList = std::vector<Tensor>;  // a Tensor[] argument of a schema

// ---------------------------------------------------------------------------------- checks
// Python sees std::invalid_argument as ValueError and std::out_of_range as IndexError (what
// TORCH_CHECK_VALUE / TORCH_CHECK_INDEX gave); other exceptions as RuntimeError. No standard
// exception becomes TypeError: the dtype checks users meet are in pcl_ext/ops.py, and the
// ones here only guard direct torch.ops calls. Run every check before the first stable call
// that could fail: on torch 2.11/2.12 an error inside one reaches Python as a generic message.
namespace detail {
template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

#define PCL_CHECK_VALUE(cond, ...) PCL_CHECK_THROW(cond, std::invalid_argument, __VA_ARGS__)
#define PCL_CHECK_INDEX(cond, ...) PCL_CHECK_THROW(cond, std::out_of_range, __VA_ARGS__)
#define PCL_CHECK(cond, ...) PCL_CHECK_THROW(cond, std::runtime_error, __VA_ARGS__)
#define PCL_INTERNAL_ASSERT(cond, ...)                                                   \
  PCL_CHECK_THROW(cond, std::logic_error, "pcl_ext internal error (please report it): ", \
                  #cond " failed at " __FILE__ ":", __LINE__, ". ", __VA_ARGS__)
#define PCL_CHECK_THROW(cond, exception, ...)                              \
  do {                                                                     \
    if (!(cond)) throw exception(::pcl_ext::detail::message(__VA_ARGS__)); \
  } while (false)

// Shapes and devices printed as ATen prints them in messages: [2, 3], cuda:0.
struct Shape {
  torch::headeronly::IntHeaderOnlyArrayRef sizes;
};
inline Shape shape(const Tensor& t) { return {t.sizes()}; }
inline std::ostream& operator<<(std::ostream& os, const Shape& s) {
  os << '[';
  for (size_t i = 0; i < s.sizes.size(); ++i) os << (i ? ", " : "") << s.sizes[i];
  return os << ']';
}

struct DeviceName {
  torch::stable::Device device;
};
inline DeviceName device_name(const Tensor& t) { return {t.device()}; }
inline std::ostream& operator<<(std::ostream& os, const DeviceName& d) {
  using torch::headeronly::DeviceType;
  switch (d.device.type()) {
    case DeviceType::CPU: os << "cpu"; break;
    case DeviceType::CUDA: os << "cuda"; break;
    case DeviceType::Meta: os << "meta"; break;
    default: os << "device type " << static_cast<int>(d.device.type());
  }
  if (d.device.has_index() && d.device.type() != DeviceType::CPU) os << ':' << d.device.index();
  return os;
}

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

// The four floating types every elementwise kernel here instantiates. The body comes last, as
// in AT_DISPATCH_*, so that the commas of a kernel launch <<<a, b, c, d>>> may appear in it.
#define PCL_DISPATCH_FLOATING(TYPE, NAME, ...)                                   \
  THO_DISPATCH_SWITCH(                                                           \
      TYPE, NAME,                                                                \
      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__)      \
      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)       \
      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)        \
      THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))

// -------------------------------------------------------------------------- memory layout
// (Each Tensor accessor is a call into libtorch: these read sizes and strides once.)

// ATen's has_internal_overlap(t) == MemOverlap::Yes: a dimension repeats elements (stride 0).
inline bool has_repeated_elements(const Tensor& t) {
  const auto sizes = t.sizes(), strides = t.strides();
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] > 1 && strides[i] == 0) return true;
  }
  return false;
}

// ATen's is_non_overlapping_and_dense(): the elements fill numel consecutive slots, each once,
// in some order of the dimensions (contiguous, channels_last, any permutation).
inline bool is_non_overlapping_and_dense(const Tensor& t) {
  const auto sizes = t.sizes(), strides = t.strides();
  std::vector<size_t> dims;  // size-1 dimensions may have any stride
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) return true;
    if (sizes[i] != 1) dims.push_back(i);
  }
  std::sort(dims.begin(), dims.end(), [&](size_t a, size_t b) { return strides[a] < strides[b]; });
  int64_t expected = 1;
  for (size_t i : dims) {
    if (strides[i] != expected) return false;
    expected *= sizes[i];
  }
  return true;
}

// Whether the bytes that a and b span intersect. Stands in for ATen's is_alias_of (same
// storage): what makes a kernel that reads one and writes the other race is shared bytes.
inline bool memory_overlaps(const Tensor& a, const Tensor& b) {
  auto span = [](const Tensor& t) {
    const auto sizes = t.sizes(), strides = t.strides();
    const auto element = static_cast<int64_t>(t.element_size());
    auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    auto hi = lo;
    for (size_t i = 0; i < sizes.size(); ++i) {
      const int64_t reach = (sizes[i] - 1) * strides[i] * element;
      (reach < 0 ? lo : hi) += reach;
    }
    return std::array<uintptr_t, 2>{lo, hi + element};
  };
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto sa = span(a), sb = span(b);
  return sa[0] < sb[1] && sb[0] < sa[1];
}

// torch::stable::contiguous() and to() are dispatcher calls (boxed, microseconds each) even when
// they have nothing to do: skip them then.
inline Tensor ensure_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}
inline Tensor contiguous_as(const Tensor& t, ScalarType dtype) {
  return ensure_contiguous(t.scalar_type() == dtype ? t : torch::stable::to(t, dtype));
}

// --------------------------------------------------------------------------- other ops
// An ATen op that torch/csrc/stable/ops.h does not wrap, through the dispatcher: the stack
// holds the arguments (every one of the schema, defaults included) and, afterwards, the
// outputs, which torch::stable::detail::to<T>(stack[i]) takes out.
template <size_t N, typename... Args>
std::array<StableIValue, N> call_aten(const char* name, const char* overload,
                                      const Args&... args) {
  static_assert(N >= sizeof...(Args), "the stack must hold every argument");
  std::array<StableIValue, N> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return stack;
}

// ---------------------------------------------------------------------------------- CPU GEMM
// A [rows, cols] CPU matrix over `data` with the given strides, in elements (no copy: the caller
// keeps the memory alive and does not write through a view of const data).
template <typename T>
Tensor cpu_matrix(const T* data, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride) {
  return torch::stable::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, col_stride},
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  torch::headeronly::CppTypeToScalarType<T>::value);
}

// out = a b and out += a b on the CPU, through the generated C shims, which call the CPU
// kernels directly. The dispatcher's mm.out refuses, in a parallel_for worker, an `a` that
// requires grad (the workers do not inherit the caller's below-autograd state), and addmm_'s
// Scalar alpha and beta cannot pass through a stable dispatcher call.
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
}
inline void addmm_(const Tensor& out, const Tensor& a, const Tensor& b) {
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_cpu_addmm_out(out.get(), out.get(), a.get(), b.get(), 1.0, 1.0));
}

#if defined(__CUDACC__)
// -------------------------------------------------------------------------------------- CUDA
using torch::stable::accelerator::DeviceGuard;

// The current CUDA stream of t's device (the stable ABI has no CUDAStream type yet).
inline cudaStream_t current_cuda_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// One property of a device (the stable ABI has no device-properties query; the runtime's
// per-attribute query is cheap, unlike cudaGetDeviceProperties).
inline int cuda_device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}
#endif

}  // namespace pcl_ext
