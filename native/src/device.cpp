// The device part of the C ABI: CUDA memory, synchronisation, graphs, TF32 and sync-debug
// switches, and which kernel scaled_dot_product_attention picks. Functions that need CUDA return
// an error when the library was built without it.
#include <sstream>

#include "dt_internal.h"

#ifdef DT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

char* dup_json(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

#ifndef DT_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error("dipsy_torch was built without CUDA; rebuild against a CUDA libtorch");
}
#endif

}  // namespace

extern "C" {

DT_API int32_t dt_set_allow_tf32(int32_t bits, char** err) {
  DT_TRY
    at::globalContext().setAllowTF32CuBLAS((bits & 1) != 0);
    at::globalContext().setAllowTF32CuDNN((bits & 2) != 0);
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_allow_tf32(char** err) {
  DT_TRY
    return (at::globalContext().allowTF32CuBLAS() ? 1 : 0) |
           (at::globalContext().allowTF32CuDNN() ? 2 : 0);
  DT_CATCH(-1)
}

DT_API int32_t dt_sdpa_backend(void* q, void* k, void* v, void* mask, int32_t causal,
                               int32_t* out, char** err) {
  DT_TRY
    TORCH_CHECK(out != nullptr, "null result slot");
    *out = static_cast<int32_t>(at::_fused_sdp_choice(
        dt::tensor(q, "q"), dt::tensor(k, "k"), dt::tensor(v, "v"), dt::optional_tensor(mask),
        0.0, causal != 0));
    return 0;
  DT_CATCH(-1)
}

#ifdef DT_WITH_CUDA

DT_API char* dt_cuda_device_info(char** err) {
  DT_TRY
    std::ostringstream js;
    js << "[";
    const int64_t n = torch::cuda::is_available() ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
    for (int64_t i = 0; i < n; i++) {
      const cudaDeviceProp* p = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(i));
      std::string name(p->name);
      for (auto& c : name) {
        if (c == '"' || c == '\\' || static_cast<unsigned char>(c) < 0x20) c = '?';
      }
      js << (i ? "," : "") << "{\"index\":" << i << ",\"name\":\"" << name << "\""
         << ",\"capability\":\"" << p->major << "." << p->minor << "\""
         << ",\"memory_bytes\":" << static_cast<int64_t>(p->totalGlobalMem)
         << ",\"multiprocessors\":" << p->multiProcessorCount << "}";
    }
    js << "]";
    return dup_json(js.str());
  DT_CATCH(nullptr)
}

DT_API char* dt_cuda_memory_stats(int32_t device, char** err) {
  DT_TRY
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    std::ostringstream js;
    js << "{\"allocated_bytes\":" << stats.allocated_bytes[agg].current
       << ",\"peak_allocated_bytes\":" << stats.allocated_bytes[agg].peak
       << ",\"reserved_bytes\":" << stats.reserved_bytes[agg].current
       << ",\"peak_reserved_bytes\":" << stats.reserved_bytes[agg].peak << "}";
    return dup_json(js.str());
  DT_CATCH(nullptr)
}

DT_API int32_t dt_cuda_reset_peak_memory_stats(int32_t device, char** err) {
  DT_TRY
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_cuda_empty_cache(char** err) {
  DT_TRY
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_cuda_synchronize(int32_t device, char** err) {
  DT_TRY
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    c10::cuda::device_synchronize();
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_cuda_set_sync_debug_mode(int32_t mode, char** err) {
  DT_TRY
    TORCH_CHECK(mode >= 0 && mode <= 2, "sync debug mode must be 0 (off), 1 (warn) or 2 (error)");
    c10::cuda::warning_state().set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(mode));
    return 0;
  DT_CATCH(-1)
}

namespace {

// A graph with the side stream its warm-up and capture run on: capture may not use the default
// stream, and libtorch keys lazily made per-stream state (the cuBLAS workspace) by stream, so the
// warm-up that creates that state must run on the stream that is captured later.
struct GraphBox {
  std::unique_ptr<at::cuda::CUDAGraph> graph = std::make_unique<at::cuda::CUDAGraph>();
  std::optional<c10::cuda::CUDAStream> side;
  // The stream that was current before the side stream was entered; set while inside.
  std::optional<c10::cuda::CUDAStream> previous;
  bool captured = false;
};

GraphBox* box_of(void* g) {
  TORCH_CHECK(g != nullptr, "null graph handle");
  return static_cast<GraphBox*>(g);
}

// `waiter` runs nothing queued after this call before `signaller` finishes what it has queued.
void stream_wait(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& signaller) {
  cudaEvent_t ev = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  const cudaError_t rec = cudaEventRecord(ev, signaller.stream());
  const cudaError_t wait = rec == cudaSuccess ? cudaStreamWaitEvent(waiter.stream(), ev, 0) : rec;
  C10_CUDA_CHECK_WARN(cudaEventDestroy(ev));
  C10_CUDA_CHECK(wait);
}

// Makes the side stream current; it first waits for the work queued so far, so the side stream
// reads inputs the caller has just written.
void enter_side(GraphBox* box) {
  TORCH_CHECK(!box->previous, "graph: warm-up or capture already in progress");
  const auto current = c10::cuda::getCurrentCUDAStream();
  if (!box->side) box->side = c10::cuda::getStreamFromPool(false, current.device_index());
  TORCH_CHECK(box->side->device_index() == current.device_index(),
              "graph: the current CUDA device changed since the graph's first use");
  stream_wait(*box->side, current);
  box->previous = current;
  c10::cuda::setCurrentCUDAStream(*box->side);
}

// Returns to the stream that was current before; with `join`, that stream then waits for the side
// stream's work, so results computed there can be used at once.
void leave_side(GraphBox* box, bool join) {
  if (!box->previous) return;
  const auto previous = *box->previous;
  box->previous.reset();
  c10::cuda::setCurrentCUDAStream(previous);
  if (join) stream_wait(previous, *box->side);
}

// After a failed capture the stream may still be capturing (an op failed inside it) and the
// failure leaves a CUDA error pending: end the capture, drop what it recorded, clear the error.
// The CUDAGraph object itself is never freed then: libtorch's caching allocator keeps a filter
// that points at it after a capture that did not end cleanly, so it must stay valid.
void abandon_capture(GraphBox* box) {
  (void)box->graph.release();
  if (box->side) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(box->side->stream(), &status) == cudaSuccess &&
        status != cudaStreamCaptureStatusNone) {
      cudaGraph_t partial = nullptr;
      cudaStreamEndCapture(box->side->stream(), &partial);
      if (partial != nullptr) cudaGraphDestroy(partial);
    }
  }
  (void)cudaGetLastError();
}

}  // namespace

DT_API void* dt_cuda_graph_new(char** err) {
  DT_TRY
    return new GraphBox();
  DT_CATCH(nullptr)
}

DT_API int32_t dt_cuda_graph_warmup_begin(void* g, char** err) {
  DT_TRY
    enter_side(box_of(g));
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_cuda_graph_warmup_end(void* g, char** err) {
  DT_TRY
    leave_side(box_of(g), true);
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_cuda_graph_capture_begin(void* g, char** err) {
  DT_TRY
    auto* box = box_of(g);
    TORCH_CHECK(!box->captured, "graph: already captured");
    TORCH_CHECK(box->graph, "graph: an earlier capture of this graph failed");
    // Everything queued before must be done: capture forbids waiting on it later, and the
    // allocator must not hand the graph's private pool memory that other work still uses.
    c10::cuda::device_synchronize();
    enter_side(box);
    try {
      box->graph->capture_begin();
    } catch (...) {
      abandon_capture(box);
      leave_side(box, false);
      throw;
    }
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_cuda_graph_capture_end(void* g, char** err) {
  DT_TRY
    auto* box = box_of(g);
    TORCH_CHECK(box->previous, "graph: capture_end without capture_begin");
    try {
      box->graph->capture_end();
    } catch (...) {
      // The stream is restored whatever happened, so the caller's next ops run eagerly as before.
      abandon_capture(box);
      leave_side(box, false);
      throw;
    }
    leave_side(box, false);
    box->captured = true;
    return 0;
  DT_CATCH(-1)
}

DT_API int32_t dt_cuda_graph_replay(void* g, char** err) {
  DT_TRY
    auto* box = box_of(g);
    TORCH_CHECK(box->captured && box->graph, "graph: replay before a successful capture");
    box->graph->replay();
    return 0;
  DT_CATCH(-1)
}

DT_API void dt_cuda_graph_free(void* g) {
  if (g == nullptr) return;
  auto* box = static_cast<GraphBox*>(g);
  try {
    if (box->previous) {
      abandon_capture(box);
      leave_side(box, false);
    }
  } catch (...) {
  }
  delete box;
}

#else

DT_API char* dt_cuda_device_info(char** err) {
  DT_TRY
    return dup_json("[]");
  DT_CATCH(nullptr)
}
DT_API char* dt_cuda_memory_stats(int32_t, char** err) {
  DT_TRY no_cuda(); DT_CATCH(nullptr)
}
DT_API int32_t dt_cuda_reset_peak_memory_stats(int32_t, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API int32_t dt_cuda_empty_cache(char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API int32_t dt_cuda_synchronize(int32_t, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API int32_t dt_cuda_set_sync_debug_mode(int32_t, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API void* dt_cuda_graph_new(char** err) {
  DT_TRY no_cuda(); DT_CATCH(nullptr)
}
DT_API int32_t dt_cuda_graph_warmup_begin(void*, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API int32_t dt_cuda_graph_warmup_end(void*, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API int32_t dt_cuda_graph_capture_begin(void*, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API int32_t dt_cuda_graph_capture_end(void*, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API int32_t dt_cuda_graph_replay(void*, char** err) {
  DT_TRY no_cuda(); DT_CATCH(-1)
}
DT_API void dt_cuda_graph_free(void*) {}

#endif

}  // extern "C"
