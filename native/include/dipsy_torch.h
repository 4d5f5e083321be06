// dipsy_torch: a small C ABI over libtorch for Deno FFI.
//
// Conventions (read this first):
// - Tensors cross the boundary as opaque handles (`void*`, a heap at::Tensor). Every call that
//   produces a tensor returns a fresh handle; dt_tensor_free drops exactly that reference.
// - Every fallible function takes a trailing `char** err`. On failure it returns NULL (pointer
//   results) or -1 (integer results) and stores a message in *err that the caller releases with
//   dt_free_string. No C++ exception crosses this boundary, and there is no thread-local
//   "last error": Deno's nonblocking calls run on worker threads.
// - Grad mode is an argument of every op wrapper (`grad`): libtorch keeps it thread-local, Deno's
//   nonblocking calls run on other threads, and each isolate (test module, Worker) has its own.
// - Integer lists (shapes, dims) are int32 arrays with an explicit length.
// - Op wrappers (`dt_op_*`) are generated from native/ops_spec.ts into src/ops.gen.cpp.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DT_API __attribute__((visibility("default")))

// Bumped whenever a signature changes; the TypeScript loader refuses a mismatch.
#define DT_ABI_VERSION 2

DT_API int32_t dt_abi_version(void);
DT_API void dt_free_string(char* s);

// Runtime information as a JSON object (caller frees with dt_free_string).
DT_API char* dt_runtime_info(char** err);
DT_API int32_t dt_set_num_threads(int32_t n, char** err);
DT_API int32_t dt_manual_seed(uint64_t seed, char** err);

// Live handle accounting, for leak tests and memory().
DT_API int64_t dt_live_handles(void);
DT_API int64_t dt_live_bytes(void);

// Tensor handles.
DT_API void dt_tensor_free(void* t);
// Frees n handles in one call (a memory scope's tensors); null entries are skipped.
DT_API void dt_tensor_free_many(void* const* ts, int32_t n);
// Writes [dtype, device (-1 cpu, k cuda:k), requires_grad, ndim, size0, size1, ...] into out.
DT_API int32_t dt_tensor_meta(void* t, int64_t* out, int32_t cap, char** err);
// Another handle to the same tensor (shares storage and autograd identity).
DT_API void* dt_tensor_share(void* t, char** err);

// Host copies: the only ways data crosses between JS memory and tensors. Both copy.
DT_API void* dt_from_host(const void* data, int64_t nbytes, const int32_t* shape, int32_t ndim,
                          int32_t dtype, char** err);
DT_API int32_t dt_to_host(void* t, void* out, int64_t nbytes, char** err);

// Reads `nbytes` at `offset` of a file straight into a new tensor of `src_dtype` and `shape`, then
// casts to `dst_dtype` (-1 keeps) and moves to `device`. Used for safetensors: the file is never
// pulled into JS memory, and at most one temporary exists per tensor.
DT_API void* dt_file_tensor(const char* path, int64_t offset, int64_t nbytes, int32_t src_dtype,
                            const int32_t* shape, int32_t ndim, int32_t dst_dtype, int32_t device,
                            char** err);

// Seeded generators (CPU or CUDA), for reproducible random draws.
DT_API void* dt_generator_new(uint64_t seed, int32_t device, char** err);
DT_API void dt_generator_free(void* g);

// TF32 for float32 matmuls (cuBLAS, bit 0) and convolutions (cuDNN, bit 1); libtorch's defaults
// are off and on. dt_allow_tf32 answers the same bits.
DT_API int32_t dt_set_allow_tf32(int32_t bits, char** err);
DT_API int32_t dt_allow_tf32(char** err);

// The kernel scaled_dot_product_attention would run for these inputs, as at::SDPBackend
// (0 math, 1 flash, 2 memory-efficient, 3 cuDNN, 4 overrideable, -1 none), stored in *out.
DT_API int32_t dt_sdpa_backend(void* q, void* k, void* v, void* mask, int32_t causal,
                               int32_t* out, char** err);

// The visible CUDA devices as a JSON array (empty without CUDA).
DT_API char* dt_cuda_device_info(char** err);

// CUDA runtime; each returns an error when the library was built without CUDA.
DT_API char* dt_cuda_memory_stats(int32_t device, char** err);
DT_API int32_t dt_cuda_reset_peak_memory_stats(int32_t device, char** err);
DT_API int32_t dt_cuda_empty_cache(char** err);
DT_API int32_t dt_cuda_synchronize(int32_t device, char** err);
// libtorch's sync debug mode (0 off, 1 warn, 2 error on every call that waits for the GPU).
DT_API int32_t dt_cuda_set_sync_debug_mode(int32_t mode, char** err);

// CUDA graphs. A graph owns a side stream: warm-up (begin/end) runs eager ops there, after the work
// queued so far, and the current stream waits for it at the end; capture records the ops issued
// between begin and end on that stream. capture_end restores the caller's stream whether or not
// the capture succeeded; a graph whose capture failed cannot be captured again. Replay runs on the
// current stream.
DT_API void* dt_cuda_graph_new(char** err);
DT_API int32_t dt_cuda_graph_warmup_begin(void* g, char** err);
DT_API int32_t dt_cuda_graph_warmup_end(void* g, char** err);
DT_API int32_t dt_cuda_graph_capture_begin(void* g, char** err);
DT_API int32_t dt_cuda_graph_capture_end(void* g, char** err);
DT_API int32_t dt_cuda_graph_replay(void* g, char** err);
DT_API void dt_cuda_graph_free(void* g);

#ifdef __cplusplus
}
#endif
