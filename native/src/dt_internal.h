// Internal helpers shared by the hand-written shim and the generated op wrappers.
#pragma once

#include <ATen/ScalarOps.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dipsy_torch.h"

// Every exported function catches everything: a C++ exception must never unwind into Deno.
// c10::Error carries a backtrace in what(); users get the short message only.
#define DT_TRY try {
#define DT_CATCH(fail)                                  \
  }                                                     \
  catch (const c10::Error& e) {                         \
    dt::set_error(err, e.what_without_backtrace());     \
    return fail;                                        \
  }                                                     \
  catch (const std::exception& e) {                     \
    dt::set_error(err, e.what());                       \
    return fail;                                        \
  }                                                     \
  catch (...) {                                         \
    dt::set_error(err, "unknown C++ exception in dipsy_torch"); \
    return fail;                                        \
  }

// Grad mode is thread-local in libtorch and nonblocking FFI calls run on other threads, so every
// op wrapper receives the caller's mode as its `grad` argument and applies it for the call.
#define DT_GRAD_MODE c10::AutoGradMode dt_grad_mode_guard(grad)

namespace dt {

void set_error(char** err, const char* msg);

// Handles are heap-allocated at::Tensor objects; each holds one reference.
void* wrap(at::Tensor t);
int32_t wrap_list(const std::vector<at::Tensor>& ts, void** out, int32_t cap);

inline const at::Tensor& tensor(void* h, const char* name) {
  if (h == nullptr) throw std::invalid_argument(std::string("null tensor handle for '") + name + "'");
  return *static_cast<at::Tensor*>(h);
}

inline std::optional<at::Tensor> optional_tensor(void* h) {
  if (h == nullptr) return std::nullopt;
  return *static_cast<at::Tensor*>(h);
}

inline std::vector<at::Tensor> tensor_list(void* const* p, int32_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; i++) {
    if (p[i] == nullptr) throw std::invalid_argument("null tensor handle in tensor list");
    out.push_back(*static_cast<at::Tensor*>(p[i]));
  }
  return out;
}

inline std::optional<double> optional_double(double d) {
  if (std::isnan(d)) return std::nullopt;
  return d;
}

inline std::optional<at::Generator> generator(void* h) {
  if (h == nullptr) return std::nullopt;
  return *static_cast<at::Generator*>(h);
}

// A double as PyTorch passes Python numbers to ops: a 0-dim "wrapped number" tensor, which keeps
// full precision in in-place ops on 16-bit tensors where a c10::Scalar is rounded first.
inline at::Tensor wrapped_scalar(double v) {
  // scalar_to_tensor builds a CPU double tensor without a dispatcher round trip, as PyTorch's own
  // wrapped_scalar_tensor does.
  at::Tensor t = at::scalar_to_tensor(c10::Scalar(v));
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

inline at::Device device(int32_t code) {
  if (code < 0) return at::Device(at::kCPU);
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(code));
}

// -2 keeps the tensor's own device (used by `to` when only the dtype changes).
inline at::Device device_of(int32_t code, const at::Tensor& like) {
  if (code == -2) return like.device();
  return device(code);
}

inline at::TensorOptions opts(int32_t dtype, int32_t device_code) {
  auto o = at::TensorOptions().device(device(device_code));
  if (dtype >= 0) o = o.dtype(static_cast<at::ScalarType>(dtype));
  return o;
}

// Fused ops (fused.cpp), bound through ops_spec.ts like the others; ops_spec.ts documents each.
at::Tensor attention(const at::Tensor& x, const std::optional<at::Tensor>& context,
                     const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& w_v,
                     const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
                     int64_t heads, const std::vector<at::Tensor>& ip_tokens,
                     const std::vector<at::Tensor>& ip_weights,
                     const std::vector<at::Tensor>& ip_scales,
                     const std::optional<at::Tensor>& residual);
at::Tensor geglu_feed_forward(const at::Tensor& x, const at::Tensor& w_in,
                              const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                              const std::optional<at::Tensor>& b_out,
                              const std::optional<at::Tensor>& residual);
at::Tensor resnet_block(const at::Tensor& x, const std::optional<at::Tensor>& temb,
                        const at::Tensor& norm1_w, const at::Tensor& norm1_b,
                        const at::Tensor& conv1_w, const std::optional<at::Tensor>& conv1_b,
                        const std::optional<at::Tensor>& temb_w,
                        const std::optional<at::Tensor>& temb_b, const at::Tensor& norm2_w,
                        const at::Tensor& norm2_b, const at::Tensor& conv2_w,
                        const std::optional<at::Tensor>& conv2_b,
                        const std::optional<at::Tensor>& shortcut_w,
                        const std::optional<at::Tensor>& shortcut_b, int64_t groups, double eps,
                        int32_t act, double output_scale);
at::Tensor image_to_tokens(const at::Tensor& x);
at::Tensor tokens_to_image(const at::Tensor& x, int64_t height, int64_t width);

}  // namespace dt
