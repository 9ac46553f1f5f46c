/* A plain C interface to megamoe, for bindings that load libmegamoe.so at run time (the Python
 * package uses it through ctypes: no compiled extension, no link to libtorch).
 *
 * Conventions
 * - Every function that can fail returns an int status: MEGAMOE_OK (0), MEGAMOE_INVALID_ARGUMENT (1:
 *   the C++ layer threw megamoe::InvalidArgument, or a handle/pointer argument of this interface is
 *   bad) or MEGAMOE_RUNTIME_ERROR (2: any other failure: CUDA, NCCL, a device-side error, out of
 *   memory). The message of the last failed call on the calling thread is megamoe_last_error().
 *   No C++ exception ever crosses this interface.
 * - Out-parameters are written only on success, except the `len` of the string functions (below).
 * - Device pointers are plain `const void*`; `stream` is a cudaStream_t passed as `void*` (NULL: the
 *   legacy default stream). Work is enqueued on `stream` without host synchronisation unless stated.
 * - String outputs (char* out, size_t cap, size_t* len): *len receives the full length (without a
 *   terminating NUL). With out == NULL only *len is written. Otherwise the call fails with
 *   MEGAMOE_INVALID_ARGUMENT when cap < *len; else the bytes are copied, followed by a NUL when
 *   cap > *len.
 * - Weight formats: MEGAMOE_FORMAT_BF16 (0) or MEGAMOE_FORMAT_FP8 (1, e4m3fn with fp32 128x128 block
 *   scales). Shapes are those of include/megamoe/shape.h (MoeShape).
 * - The torch-free functions (version, last_error, shape_validate, workspace_table, compact_pool_rows)
 *   do not touch CUDA: they work on a machine without a GPU or a driver.
 */
#ifndef MEGAMOE_C_API_H_
#define MEGAMOE_C_API_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MEGAMOE_C_EXPORT __declspec(dllexport)
#else
#define MEGAMOE_C_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or a convention of this header changes; bindings check it on load. */
#define MEGAMOE_C_ABI_VERSION 2

enum {
  MEGAMOE_OK = 0,
  MEGAMOE_INVALID_ARGUMENT = 1,
  MEGAMOE_RUNTIME_ERROR = 2,
};

enum {
  MEGAMOE_FORMAT_BF16 = 0,
  MEGAMOE_FORMAT_FP8 = 1,
};

/* How a layer's forward runs (megamoe::ForwardImpl): MEGAMOE_IMPL_DEFAULT (0: MEGAMOE_IMPL from the
 * environment, else staged), MEGAMOE_IMPL_STAGED (1: one kernel per stage, the reference) or
 * MEGAMOE_IMPL_FUSED (2: one persistent kernel per forward). */
enum {
  MEGAMOE_IMPL_DEFAULT = 0,
  MEGAMOE_IMPL_STAGED = 1,
  MEGAMOE_IMPL_FUSED = 2,
};

typedef struct megamoe_comm megamoe_comm;   /* a Communicator (one rank's end of it) */
typedef struct megamoe_layer megamoe_layer; /* a Layer; keeps its communicator alive */

/* ---- library information (never fail) */

/* The library version, e.g. "0.1.0" (static storage). */
MEGAMOE_C_EXPORT const char* megamoe_version(void);
/* MEGAMOE_C_ABI_VERSION of the library as built. */
MEGAMOE_C_EXPORT int megamoe_abi_version(void);
/* The message of the last call on this thread that did not return MEGAMOE_OK ("" if none). Valid
 * until the next failing call on this thread. */
MEGAMOE_C_EXPORT const char* megamoe_last_error(void);

/* ---- shapes and the workspace, without a GPU */

/* MEGAMOE_INVALID_ARGUMENT with a message naming the first bad field ("hidden = 100: must be a
 * positive multiple of 128"), as megamoe::validate does. */
MEGAMOE_C_EXPORT int megamoe_shape_validate(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k,
                                            int64_t ep_size, int64_t max_tokens_per_rank, int weight_format,
                                            float swiglu_limit);

/* A named preset's dimensions ("dsv3", "dsv4-flash", "dsv4-pro", "tiny"), as megamoe::make_preset
 * builds them; MEGAMOE_INVALID_ARGUMENT naming the known presets for another name. */
MEGAMOE_C_EXPORT int megamoe_preset(const char* name, int64_t* hidden, int64_t* intermediate, int64_t* num_experts,
                                    int64_t* top_k, float* swiglu_limit);

/* The workspace table of one rank for a shape (WorkspaceLayout::to_string; validates the shape), with
 * a token pool of pool_rows rows (0 or at least W*Tmax*K: the worst case, every pair of every rank;
 * else a multiple of 256, a windowed pool of the fused forward, as megamoe_layer_create takes it). */
MEGAMOE_C_EXPORT int megamoe_workspace_table(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k,
                                             int64_t ep_size, int64_t max_tokens_per_rank, int weight_format,
                                             float swiglu_limit, int64_t pool_rows, char* out, size_t cap, size_t* len);

/* megamoe::compact_pool_rows: the fused forward's default pool, one window under uniform
 * routing (1.25 x a rank's uniform share plus a 256-row unit per local expert, rounded up to 256), or
 * 0 when no such pool is smaller than the worst case. Validates the shape. */
MEGAMOE_C_EXPORT int megamoe_compact_pool_rows(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k,
                                               int64_t ep_size, int64_t max_tokens_per_rank, int weight_format,
                                               float swiglu_limit, int64_t* out);

/* megamoe::largest_pool_rows_within: the largest token pool whose workspace per rank fits in
 * max_bytes: the worst case when that fits, else a multiple of 256 below it (a windowed pool of the
 * fused forward), else 0 (none fits). Validates the shape. */
MEGAMOE_C_EXPORT int megamoe_largest_pool_rows_within(int64_t hidden, int64_t intermediate, int64_t num_experts,
                                                      int64_t top_k, int64_t ep_size, int64_t max_tokens_per_rank,
                                                      int weight_format, float swiglu_limit, uint64_t max_bytes,
                                                      int64_t* out);

/* ---- communicators */

/* Rank 0's NCCL unique id (binary, NCCL_UNIQUE_ID_BYTES long) to hand to every rank over the
 * caller's own channel. Pass a buffer of at least 128 bytes: every call makes a new id, so the
 * length-query form (out == NULL) is of no use here. */
MEGAMOE_C_EXPORT int megamoe_nccl_unique_id(char* out, size_t cap, size_t* len);

/* Collective over `world` processes (one per GPU): every rank calls it with the same id. */
MEGAMOE_C_EXPORT int megamoe_comm_create_nccl(int rank, int world, int device, const char* id, size_t id_len,
                                              megamoe_comm** out);

/* A single-rank communicator on `device` (the loopback transport with world size 1: no NCCL). */
MEGAMOE_C_EXPORT int megamoe_comm_create_local(int device, megamoe_comm** out);

/* Releases the caller's reference; the communicator itself lives until its last layer is destroyed
 * too. NULL is accepted (no-op). Collective for NCCL communicators: every rank destroys in the same
 * order. */
MEGAMOE_C_EXPORT int megamoe_comm_destroy(megamoe_comm* comm);

MEGAMOE_C_EXPORT int megamoe_comm_info(const megamoe_comm* comm, int* rank, int* world, int* device);

/* ---- layers */

/* Collective over the communicator's ranks: ep_size = the communicator's world size. Allocates the
 * whole workspace on the communicator's device. num_sms = 0: every SM of the GPU. impl: a
 * MEGAMOE_IMPL_* value. pool_rows: megamoe::LayerOptions::pool_rows (0: the forward's default: the
 * worst case for the staged forward; for the fused one MEGAMOE_POOL_ROWS from the environment, else
 * megamoe_compact_pool_rows; at least W*Tmax*K: the worst case; a multiple of 256 below that runs the
 * fused forward in windows; the staged forward rejects it). */
MEGAMOE_C_EXPORT int megamoe_layer_create(megamoe_comm* comm, int64_t hidden, int64_t intermediate,
                                          int64_t num_experts, int64_t top_k, int64_t max_tokens_per_rank,
                                          int weight_format, float swiglu_limit, int num_sms, int impl,
                                          int64_t pool_rows, megamoe_layer** out);

/* Synchronises the device and frees the workspace (collective for NCCL communicators). NULL is
 * accepted (no-op). */
MEGAMOE_C_EXPORT int megamoe_layer_destroy(megamoe_layer* layer);

/* Every local expert's weights (checkpoint layout, device pointers):
 *   w1 [E_local, 2I, H] (gate rows, then up rows), w2 [E_local, H, I];
 *   format MEGAMOE_FORMAT_FP8: w1_scale [E_local, 2I/128, H/128], w2_scale [E_local, H/128, I/128] fp32;
 *   MEGAMOE_FORMAT_BF16: the scales must be NULL; on an fp8 layer the weights are quantised on the device.
 * Layer::load_weights: synchronises `stream` for fp8 scale checks. */
MEGAMOE_C_EXPORT int megamoe_layer_load_weights(megamoe_layer* layer, int format, const void* w1, const void* w2,
                                                const float* w1_scale, const float* w2_scale, void* stream);

/* The same for local experts [first, first + count) (the buffers hold `count` experts). */
MEGAMOE_C_EXPORT int megamoe_layer_load_expert_weights(megamoe_layer* layer, int64_t first, int64_t count, int format,
                                                       const void* w1, const void* w2, const float* w1_scale,
                                                       const float* w2_scale, void* stream);

/* One forward (Layer::forward with ForwardArgs), enqueued on `stream`, no host synchronisation:
 *   x [T, H] bf16, or e4m3 with x_scale [T, H/128] fp32 (fp8 layers; x_scale NULL for bf16 x);
 *   topk_ids [T, K] int32 (ids_int64 = 0) or int64 (ids_int64 = 1), -1 = no expert;
 *   topk_weights [T, K] fp32; y [T, H] bf16 = output_scale * sum_k w[t,k] * expert(x[t]);
 *   T = num_tokens, or, when num_tokens_device is not NULL, the int32 it points to, read on the
 *   device (then every buffer holds max_tokens_per_rank rows and num_tokens is ignored). */
MEGAMOE_C_EXPORT int megamoe_layer_forward(megamoe_layer* layer, const void* x, const float* x_scale,
                                           const void* topk_ids, int ids_int64, const float* topk_weights, void* y,
                                           float output_scale, int64_t num_tokens, const int32_t* num_tokens_device,
                                           void* stream);

/* Layer::check_errors: synchronises, then MEGAMOE_RUNTIME_ERROR with the device-recorded message
 * (bad expert id, device token count out of range, peer timeout). */
MEGAMOE_C_EXPORT int megamoe_layer_check_errors(megamoe_layer* layer);

/* Layer::synchronize: waits for everything enqueued on `stream` (a cudaStream_t; graph replays
 * included) without blocking forever on a dead rank, then check_errors. */
MEGAMOE_C_EXPORT int megamoe_layer_synchronize(megamoe_layer* layer, void* stream);

/* This layer's rank, the SM budget in effect, the forward implementation (MEGAMOE_IMPL_STAGED or
 * MEGAMOE_IMPL_FUSED, as resolved at creation) and the token pool's rows (WorkspaceLayout::pool_rows).
 * Any out-pointer may be NULL. */
MEGAMOE_C_EXPORT int megamoe_layer_info(const megamoe_layer* layer, int* rank, int* num_sms, int* impl,
                                        int64_t* pool_rows);

/* The layer's own workspace table (WorkspaceLayout::to_string), same conventions as above. */
MEGAMOE_C_EXPORT int megamoe_layer_workspace_table(const megamoe_layer* layer, char* out, size_t cap, size_t* len);

/* ---- weights */

/* bf16 [experts, rows, cols] (rows, cols multiples of 128) -> e4m3 [experts, rows, cols] and fp32
 * scales [experts, rows/128, cols/128], DeepSeek's 128x128 block format; enqueued on `stream` on
 * the current CUDA device. */
MEGAMOE_C_EXPORT int megamoe_quantize_weights_fp8(const void* bf16_weights, int64_t experts, int64_t rows, int64_t cols,
                                                  void* fp8_out, float* scale_out, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MEGAMOE_C_API_H_ */
