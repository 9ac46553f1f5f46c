// The C interface (include/megamoe/c_api.h) over the public C++ API. Every entry point runs its body
// inside `guarded`, which turns exceptions into a status and a thread-local message.
#include "megamoe/c_api.h"
#include "megamoe/version.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "megamoe/communicator.h"
#include "megamoe/error.h"
#include "megamoe/layer.h"
#include "megamoe/layout.h"
#include "megamoe/shape.h"



struct megamoe_comm {
  std::shared_ptr<megamoe::Communicator> comm;
};

struct megamoe_layer {
  // Declared before `layer` so that it is destroyed after it: the layer's workspace lives in the
  // communicator's symmetric memory, and Layer keeps a reference to the communicator.
  std::shared_ptr<megamoe::Communicator> comm;
  std::unique_ptr<megamoe::Layer> layer;
  int device = 0;
};

namespace {

thread_local std::string g_last_error;

void set_last_error(const char* message) noexcept {
  try {
    g_last_error = message ? message : "";
  } catch (...) {
    // Out of memory for the message itself: keep whatever was there.
  }
}

template <class Body>
int guarded(Body&& body) noexcept {
  try {
    body();
    return MEGAMOE_OK;
  } catch (const megamoe::InvalidArgument& e) {
    set_last_error(e.what());
    return MEGAMOE_INVALID_ARGUMENT;
  } catch (const std::bad_alloc&) {
    set_last_error("out of host memory");
    return MEGAMOE_RUNTIME_ERROR;
  } catch (const std::exception& e) {
    set_last_error(e.what());
    return MEGAMOE_RUNTIME_ERROR;
  } catch (...) {
    set_last_error("unknown C++ exception");
    return MEGAMOE_RUNTIME_ERROR;
  }
}

[[noreturn]] void invalid(const std::string& message) { throw megamoe::InvalidArgument(message); }

template <class T>
T& require(T* handle, const char* name) {
  if (!handle) invalid(std::string(name) + ": null handle");
  return *handle;
}

template <class T>
void require_out(T* out, const char* name) {
  if (!out) invalid(std::string(name) + ": null pointer (an output argument)");
}

megamoe::WeightFormat weight_format(int value, const char* name) {
  switch (value) {
    case MEGAMOE_FORMAT_BF16: return megamoe::WeightFormat::kBf16;
    case MEGAMOE_FORMAT_FP8: return megamoe::WeightFormat::kFp8;
    default: invalid(std::string(name) + " = " + std::to_string(value) + ": must be 0 (bf16) or 1 (fp8)");
  }
}

megamoe::MoeShape make_shape(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k,
                             int64_t ep_size, int64_t max_tokens_per_rank, int format, float swiglu_limit) {
  megamoe::MoeShape shape;
  shape.hidden = hidden;
  shape.intermediate = intermediate;
  shape.num_experts = num_experts;
  shape.top_k = top_k;
  shape.ep_size = ep_size;
  shape.max_tokens_per_rank = max_tokens_per_rank;
  shape.weight_format = weight_format(format, "weight_format");
  shape.swiglu_limit = swiglu_limit;
  return shape;
}

// See the header: *len = size; out == NULL queries; cap < size fails.
void write_bytes(const std::string& bytes, char* out, size_t cap, size_t* len) {
  require_out(len, "len");
  *len = bytes.size();
  if (!out) return;
  if (cap < bytes.size())
    invalid("cap = " + std::to_string(cap) + ": the output needs " + std::to_string(bytes.size()) + " bytes");
  std::memcpy(out, bytes.data(), bytes.size());
  if (cap > bytes.size()) out[bytes.size()] = '\0';
}

// Makes `device` current for the duration of a call and restores the caller's device afterwards
// (PyTorch and other callers keep their own notion of the current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device) {
      const cudaError_t status = cudaSetDevice(device);
      if (status != cudaSuccess) {
        cudaGetLastError();
        throw megamoe::RuntimeError("cudaSetDevice(" + std::to_string(device) + "): " + cudaGetErrorString(status));
      }
      restore_ = previous_ >= 0;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool restore_ = false;
};

megamoe::ExpertWeightsView weights_view(int format, const void* w1, const void* w2, const float* w1_scale,
                                        const float* w2_scale) {
  megamoe::ExpertWeightsView view;
  view.format = weight_format(format, "format");
  if (!w1) invalid("w1: null pointer");
  if (!w2) invalid("w2: null pointer");
  if (view.format == megamoe::WeightFormat::kBf16) {
    if (w1_scale) invalid("w1_scale: must be NULL for bf16 weights");
    if (w2_scale) invalid("w2_scale: must be NULL for bf16 weights");
  } else {
    if (!w1_scale) invalid("w1_scale: null pointer (fp8 weights need fp32 scales [E_local, 2I/128, H/128])");
    if (!w2_scale) invalid("w2_scale: null pointer (fp8 weights need fp32 scales [E_local, H/128, I/128])");
  }
  view.w1 = w1;
  view.w2 = w2;
  view.w1_scale = w1_scale;
  view.w2_scale = w2_scale;
  return view;
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

extern "C" {

const char* megamoe_version(void) { return megamoe::kVersion; }

int megamoe_abi_version(void) { return MEGAMOE_C_ABI_VERSION; }

const char* megamoe_last_error(void) { return g_last_error.c_str(); }

int megamoe_shape_validate(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k, int64_t ep_size,
                           int64_t max_tokens_per_rank, int weight_format, float swiglu_limit) {
  return guarded([&] {
    megamoe::validate(
        make_shape(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_format, swiglu_limit));
  });
}

int megamoe_preset(const char* name, int64_t* hidden, int64_t* intermediate, int64_t* num_experts, int64_t* top_k,
                   float* swiglu_limit) {
  return guarded([&] {
    if (!name) invalid("name: null pointer (a preset name)");
    require_out(hidden, "hidden");
    require_out(intermediate, "intermediate");
    require_out(num_experts, "num_experts");
    require_out(top_k, "top_k");
    require_out(swiglu_limit, "swiglu_limit");
    const megamoe::MoeShape shape = megamoe::make_preset(name, /*ep_size=*/1, /*max_tokens_per_rank=*/1);
    *hidden = shape.hidden;
    *intermediate = shape.intermediate;
    *num_experts = shape.num_experts;
    *top_k = shape.top_k;
    *swiglu_limit = shape.swiglu_limit;
  });
}

int megamoe_workspace_table(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k, int64_t ep_size,
                            int64_t max_tokens_per_rank, int weight_format, float swiglu_limit, int64_t pool_rows,
                            char* out, size_t cap, size_t* len) {
  return guarded([&] {
    const megamoe::MoeShape shape =
        make_shape(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_format, swiglu_limit);
    megamoe::validate(shape);
    write_bytes(megamoe::WorkspaceLayout(shape, pool_rows).to_string(), out, cap, len);  // checks pool_rows
  });
}

int megamoe_compact_pool_rows(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k, int64_t ep_size,
                              int64_t max_tokens_per_rank, int weight_format, float swiglu_limit, int64_t* out) {
  return guarded([&] {
    require_out(out, "out");
    const megamoe::MoeShape shape =
        make_shape(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_format, swiglu_limit);
    megamoe::validate(shape);
    *out = megamoe::compact_pool_rows(shape);
  });
}

int megamoe_largest_pool_rows_within(int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k,
                                     int64_t ep_size, int64_t max_tokens_per_rank, int weight_format, float swiglu_limit,
                                     uint64_t max_bytes, int64_t* out) {
  return guarded([&] {
    require_out(out, "out");
    const megamoe::MoeShape shape =
        make_shape(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_format, swiglu_limit);
    megamoe::validate(shape);
    *out = megamoe::largest_pool_rows_within(shape, size_t(max_bytes));
  });
}

int megamoe_nccl_unique_id(char* out, size_t cap, size_t* len) {
  return guarded([&] {
    require_out(out, "out");
    write_bytes(megamoe::nccl_unique_id(), out, cap, len);
  });
}

int megamoe_comm_create_nccl(int rank, int world, int device, const char* id, size_t id_len, megamoe_comm** out) {
  return guarded([&] {
    require_out(out, "out");
    if (!id || id_len == 0) invalid("id: empty (pass rank 0's megamoe_nccl_unique_id bytes)");
    DeviceGuard guard(device);
    auto handle = std::make_unique<megamoe_comm>();
    handle->comm = megamoe::create_nccl_communicator(rank, world, device, std::string(id, id_len));
    *out = handle.release();
  });
}

int megamoe_comm_create_local(int device, megamoe_comm** out) {
  return guarded([&] {
    require_out(out, "out");
    DeviceGuard guard(device);
    std::vector<std::unique_ptr<megamoe::Communicator>> comms = megamoe::create_loopback_communicators(1, device);
    if (comms.size() != 1 || !comms[0]) throw megamoe::RuntimeError("create_loopback_communicators(1) returned no communicator");
    auto handle = std::make_unique<megamoe_comm>();
    handle->comm = std::move(comms[0]);
    *out = handle.release();
  });
}

int megamoe_comm_destroy(megamoe_comm* comm) {
  return guarded([&] {
    if (!comm) return;
    std::unique_ptr<megamoe_comm> owned(comm);
    if (owned->comm && owned->comm.use_count() == 1) {
      // The last reference: the communicator is destroyed now, on its device.
      DeviceGuard guard(owned->comm->device());
      owned->comm.reset();
    }
  });
}

int megamoe_comm_info(const megamoe_comm* comm, int* rank, int* world, int* device) {
  return guarded([&] {
    const megamoe_comm& c = require(comm, "comm");
    if (rank) *rank = c.comm->rank();
    if (world) *world = c.comm->world_size();
    if (device) *device = c.comm->device();
  });
}

int megamoe_layer_create(megamoe_comm* comm, int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k,
                         int64_t max_tokens_per_rank, int weight_format, float swiglu_limit, int num_sms, int impl,
                         int64_t pool_rows, megamoe_layer** out) {
  return guarded([&] {
    megamoe_comm& c = require(comm, "comm");
    require_out(out, "out");
    if (num_sms < 0) invalid("num_sms = " + std::to_string(num_sms) + ": must be >= 0 (0: every SM of the GPU)");
    if (impl != MEGAMOE_IMPL_DEFAULT && impl != MEGAMOE_IMPL_STAGED && impl != MEGAMOE_IMPL_FUSED)
      invalid("impl = " + std::to_string(impl) + ": must be MEGAMOE_IMPL_DEFAULT (0), MEGAMOE_IMPL_STAGED (1) or " +
              "MEGAMOE_IMPL_FUSED (2)");
    const megamoe::MoeShape shape = make_shape(hidden, intermediate, num_experts, top_k, c.comm->world_size(),
                                               max_tokens_per_rank, weight_format, swiglu_limit);
    megamoe::validate(shape);
    megamoe::LayerOptions options;
    options.num_sms = num_sms;
    options.impl = impl == MEGAMOE_IMPL_STAGED  ? megamoe::ForwardImpl::kStaged
                   : impl == MEGAMOE_IMPL_FUSED ? megamoe::ForwardImpl::kFused
                                                : megamoe::ForwardImpl::kDefault;
    // The rules of megamoe::pool_rows_for, named as this function's argument (0 stays 0: the default
    // the layer resolves for its forward); the layer checks again
    // (naming options.pool_rows) once the default forward is resolved (MEGAMOE_IMPL).
    if (impl == MEGAMOE_IMPL_DEFAULT) megamoe::validate_pool_rows(shape, pool_rows, "pool_rows");
    else megamoe::pool_rows_for(shape, pool_rows, impl == MEGAMOE_IMPL_FUSED, "pool_rows");
    options.pool_rows = pool_rows;
    auto handle = std::make_unique<megamoe_layer>();
    handle->comm = c.comm;
    handle->device = c.comm->device();
    DeviceGuard guard(handle->device);
    handle->layer = std::make_unique<megamoe::Layer>(shape, *handle->comm, options);
    *out = handle.release();
  });
}

int megamoe_layer_destroy(megamoe_layer* layer) {
  return guarded([&] {
    if (!layer) return;
    std::unique_ptr<megamoe_layer> owned(layer);
    DeviceGuard guard(owned->device);
    owned->layer.reset();
    owned->comm.reset();
  });
}

int megamoe_layer_load_weights(megamoe_layer* layer, int format, const void* w1, const void* w2,
                               const float* w1_scale, const float* w2_scale, void* stream) {
  return guarded([&] {
    megamoe_layer& l = require(layer, "layer");
    const megamoe::ExpertWeightsView view = weights_view(format, w1, w2, w1_scale, w2_scale);
    DeviceGuard guard(l.device);
    l.layer->load_weights(view, as_stream(stream));
  });
}

int megamoe_layer_load_expert_weights(megamoe_layer* layer, int64_t first, int64_t count, int format, const void* w1,
                                      const void* w2, const float* w1_scale, const float* w2_scale, void* stream) {
  return guarded([&] {
    megamoe_layer& l = require(layer, "layer");
    const megamoe::ExpertWeightsView view = weights_view(format, w1, w2, w1_scale, w2_scale);
    DeviceGuard guard(l.device);
    l.layer->load_expert_weights(first, count, view, as_stream(stream));
  });
}

int megamoe_layer_forward(megamoe_layer* layer, const void* x, const float* x_scale, const void* topk_ids,
                          int ids_int64, const float* topk_weights, void* y, float output_scale, int64_t num_tokens,
                          const int32_t* num_tokens_device, void* stream) {
  return guarded([&] {
    megamoe_layer& l = require(layer, "layer");
    if (ids_int64 != 0 && ids_int64 != 1)
      invalid("ids_int64 = " + std::to_string(ids_int64) + ": must be 0 (int32 topk_ids) or 1 (int64)");
    megamoe::ForwardArgs args;
    args.x = x;
    args.x_scale = x_scale;
    args.topk_ids = topk_ids;
    args.topk_ids_type = ids_int64 ? megamoe::IndexType::kInt64 : megamoe::IndexType::kInt32;
    args.topk_weights = topk_weights;
    args.y = y;
    args.output_scale = output_scale;
    args.num_tokens = num_tokens;
    args.num_tokens_device = num_tokens_device;
    DeviceGuard guard(l.device);
    l.layer->forward(args, as_stream(stream));
  });
}

int megamoe_layer_check_errors(megamoe_layer* layer) {
  return guarded([&] {
    megamoe_layer& l = require(layer, "layer");
    DeviceGuard guard(l.device);
    l.layer->check_errors();
  });
}

int megamoe_layer_synchronize(megamoe_layer* layer, void* stream) {
  return guarded([&] {
    megamoe_layer& l = require(layer, "layer");
    DeviceGuard guard(l.device);
    l.layer->synchronize(as_stream(stream));
  });
}

int megamoe_layer_info(const megamoe_layer* layer, int* rank, int* num_sms, int* impl, int64_t* pool_rows) {
  return guarded([&] {
    const megamoe_layer& l = require(layer, "layer");
    if (rank) *rank = l.layer->rank();
    if (num_sms) *num_sms = l.layer->num_sms();
    if (impl) *impl = l.layer->impl() == megamoe::ForwardImpl::kFused ? MEGAMOE_IMPL_FUSED : MEGAMOE_IMPL_STAGED;
    if (pool_rows) *pool_rows = l.layer->layout().pool_rows();
  });
}

int megamoe_layer_workspace_table(const megamoe_layer* layer, char* out, size_t cap, size_t* len) {
  return guarded([&] {
    const megamoe_layer& l = require(layer, "layer");
    write_bytes(l.layer->layout().to_string(), out, cap, len);
  });
}

int megamoe_quantize_weights_fp8(const void* bf16_weights, int64_t experts, int64_t rows, int64_t cols, void* fp8_out,
                                 float* scale_out, void* stream) {
  return guarded([&] {
    if (!bf16_weights) invalid("bf16_weights: null pointer");
    if (!fp8_out) invalid("fp8_out: null pointer");
    if (!scale_out) invalid("scale_out: null pointer");
    if (experts < 1) invalid("experts = " + std::to_string(experts) + ": must be >= 1");
    if (rows <= 0 || rows % 128) invalid("rows = " + std::to_string(rows) + ": must be a positive multiple of 128");
    if (cols <= 0 || cols % 128) invalid("cols = " + std::to_string(cols) + ": must be a positive multiple of 128");
    megamoe::quantize_weights_fp8(bf16_weights, experts, rows, cols, fp8_out, scale_out, as_stream(stream));
  });
}

}  // extern "C"
