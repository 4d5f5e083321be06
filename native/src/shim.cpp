// The hand-written part of the C ABI: errors, handles, host copies, file reads, runtime info,
// generators. The CUDA runtime (memory, graphs) and the SDPA backend choice are in device.cpp.
#include <fcntl.h>
#include <unistd.h>

#include <sstream>

#include "dt_internal.h"

#ifdef DT_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

namespace {

std::atomic<int64_t> g_live_handles{0};
std::atomic<int64_t> g_live_bytes{0};

int64_t logical_bytes(const at::Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size()) : 0;
}

char* dup_string(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

std::vector<int64_t> shape_of(const int32_t* shape, int32_t ndim) {
  if (ndim < 0 || (ndim > 0 && shape == nullptr)) throw std::invalid_argument("invalid shape");
  std::vector<int64_t> v(shape, shape + ndim);
  for (auto d : v) {
    if (d < 0) throw std::invalid_argument("negative dimension in shape");
  }
  return v;
}

at::ScalarType scalar_type(int32_t code) {
  switch (code) {
    case 0: case 1: case 2: case 3: case 4: case 5: case 6: case 7: case 11: case 15:
      return static_cast<at::ScalarType>(code);
    default:
      throw std::invalid_argument("unsupported dtype code " + std::to_string(code));
  }
}

#ifndef DT_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error("dipsy_torch was built without CUDA; rebuild against a CUDA libtorch");
}
#endif

}  // namespace

namespace dt {

void set_error(char** err, const char* msg) {
  if (err != nullptr) *err = dup_string(msg != nullptr ? msg : "unknown error");
}

void* wrap(at::Tensor t) {
  g_live_handles.fetch_add(1, std::memory_order_relaxed);
  g_live_bytes.fetch_add(logical_bytes(t), std::memory_order_relaxed);
  return new at::Tensor(std::move(t));
}

int32_t wrap_list(const std::vector<at::Tensor>& ts, void** out, int32_t cap) {
  const auto n = static_cast<int32_t>(ts.size());
  if (n > cap) {
    throw std::length_error("op returned " + std::to_string(n) + " tensors, more than the " +
                            std::to_string(cap) + " the caller can take");
  }
  for (int32_t i = 0; i < n; i++) out[i] = wrap(ts[static_cast<size_t>(i)]);
  return n;
}

}  // namespace dt

extern "C" {

DT_API int32_t dt_abi_version(void) { return DT_ABI_VERSION; }

DT_API void dt_free_string(char* s) { std::free(s); }

DT_API char* dt_runtime_info(char** err) {
  DT_TRY
    std::ostringstream js;
    bool cuda = false;
    int64_t devices = 0;
#ifdef DT_WITH_CUDA
    cuda = torch::cuda::is_available();
    devices = cuda ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
#endif
    js << "{\"torch_version\":\"" << TORCH_VERSION << "\""
       << ",\"abi_version\":" << DT_ABI_VERSION
       << ",\"built_with_cuda\":" <<
#ifdef DT_WITH_CUDA
        "true"
#else
        "false"
#endif
       << ",\"cuda_available\":" << (cuda ? "true" : "false")
       << ",\"cuda_device_count\":" << devices
       << ",\"num_threads\":" << at::get_num_threads()
       << ",\"cxx11_abi\":" << (_GLIBCXX_USE_CXX11_ABI ? "true" : "false") << "}";
    return dup_string(js.str());
  DT_CATCH(nullptr)
}

DT_API int32_t dt_set_num_threads(int32_t n, char** err) {
  DT_TRY
    TORCH_CHECK(n > 0, "number of threads must be positive, got ", n);
    at::set_num_threads(n);
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_manual_seed(uint64_t seed, char** err) {
  DT_TRY
    torch::manual_seed(seed);
    return 0;
  DT_CATCH(-1)
}

DT_API int64_t dt_live_handles(void) { return g_live_handles.load(); }

DT_API int64_t dt_live_bytes(void) { return g_live_bytes.load(); }

DT_API void dt_tensor_free(void* t) {
  if (t == nullptr) return;
  auto* p = static_cast<at::Tensor*>(t);
  g_live_handles.fetch_sub(1, std::memory_order_relaxed);
  g_live_bytes.fetch_sub(logical_bytes(*p), std::memory_order_relaxed);
  delete p;
}

DT_API void dt_tensor_free_many(void* const* ts, int32_t n) {
  if (ts == nullptr) return;
  for (int32_t i = 0; i < n; i++) dt_tensor_free(ts[i]);
}

DT_API int32_t dt_tensor_meta(void* t, int64_t* out, int32_t cap, char** err) {
  DT_TRY
    const at::Tensor& x = dt::tensor(t, "tensor");
    TORCH_CHECK(x.defined(), "tensor is undefined");
    const int64_t ndim = x.dim();
    TORCH_CHECK(cap >= 4 + ndim, "metadata buffer too small for ", ndim, " dimensions");
    out[0] = static_cast<int64_t>(x.scalar_type());
    out[1] = x.is_cuda() ? x.device().index() : -1;
    out[2] = x.requires_grad() ? 1 : 0;
    out[3] = ndim;
    for (int64_t i = 0; i < ndim; i++) out[4 + i] = x.size(i);
    return 0;
  DT_CATCH(-1)
}

DT_API void* dt_tensor_share(void* t, char** err) {
  DT_TRY
    return dt::wrap(dt::tensor(t, "tensor"));
  DT_CATCH(nullptr)
}

DT_API void* dt_from_host(const void* data, int64_t nbytes, const int32_t* shape, int32_t ndim,
                          int32_t dtype, char** err) {
  DT_TRY
    const auto st = scalar_type(dtype);
    at::Tensor t = at::empty(shape_of(shape, ndim), at::TensorOptions().dtype(st));
    const int64_t want = logical_bytes(t);
    TORCH_CHECK(want == nbytes, "host buffer holds ", nbytes, " bytes but shape ", t.sizes(),
                " of ", st, " needs ", want);
    if (want > 0) std::memcpy(t.data_ptr(), data, static_cast<size_t>(want));
    return dt::wrap(std::move(t));
  DT_CATCH(nullptr)
}

DT_API int32_t dt_to_host(void* t, void* out, int64_t nbytes, char** err) {
  DT_TRY
    const at::Tensor& x = dt::tensor(t, "tensor");
    at::Tensor c = x.detach().to(at::kCPU).contiguous();
    const int64_t have = logical_bytes(c);
    TORCH_CHECK(have == nbytes, "tensor of shape ", c.sizes(), " holds ", have,
                " bytes but the host buffer has ", nbytes);
    if (have > 0) std::memcpy(out, c.data_ptr(), static_cast<size_t>(have));
    return 0;
  DT_CATCH(-1)
}

DT_API void* dt_file_tensor(const char* path, int64_t offset, int64_t nbytes, int32_t src_dtype,
                            const int32_t* shape, int32_t ndim, int32_t dst_dtype, int32_t device,
                            char** err) {
  DT_TRY
    TORCH_CHECK(path != nullptr, "null path");
    TORCH_CHECK(offset >= 0, "negative file offset");
    const auto st = scalar_type(src_dtype);
    at::Tensor t = at::empty(shape_of(shape, ndim), at::TensorOptions().dtype(st));
    TORCH_CHECK(logical_bytes(t) == nbytes, path, ": ", nbytes, " bytes cannot hold shape ",
                t.sizes(), " of ", st);
    // pread straight into the tensor: one copy, and no file pages stay mapped to inflate RSS.
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    TORCH_CHECK(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
    auto* dst = static_cast<char*>(t.data_ptr());
    int64_t done = 0;
    while (done < nbytes) {
      const ssize_t r = ::pread(fd, dst + done, static_cast<size_t>(nbytes - done), offset + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        const int e = errno;
        ::close(fd);
        TORCH_CHECK(false, path, ": file ends or fails at byte ", offset + done, " while reading ",
                    nbytes, " bytes from offset ", offset, r < 0 ? std::string(" (") + std::strerror(e) + ")" : "");
      }
      done += r;
    }
    ::close(fd);
    const auto want = dst_dtype < 0 ? st : scalar_type(dst_dtype);
    const auto dev = dt::device(device);
    if (want != st || dev != t.device()) t = t.to(dev, want);
    return dt::wrap(std::move(t));
  DT_CATCH(nullptr)
}

DT_API void* dt_generator_new(uint64_t seed, int32_t device, char** err) {
  DT_TRY
    at::Generator g;
    if (device < 0) {
      g = at::make_generator<at::CPUGeneratorImpl>(seed);
    } else {
#ifdef DT_WITH_CUDA
      g = at::make_generator<at::CUDAGeneratorImpl>(static_cast<c10::DeviceIndex>(device));
      g.set_current_seed(seed);
#else
      no_cuda();
#endif
    }
    return new at::Generator(std::move(g));
  DT_CATCH(nullptr)
}

DT_API void dt_generator_free(void* g) { delete static_cast<at::Generator*>(g); }

}  // extern "C"
