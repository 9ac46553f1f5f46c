#include "layer/workspace.h"

#include "runtime/cuda_check.h"

namespace megamoe {

Workspace::Workspace(const MoeShape& shape, Communicator& comm, int64_t pool_rows) : layout_(shape, pool_rows) {
  if (shape.ep_size != comm.world_size())
    throw InvalidArgument("shape.ep_size = " + std::to_string(shape.ep_size) + ": must equal the number of ranks (" +
                          std::to_string(comm.world_size()) + ")");
  symmetric_ = comm.allocate_symmetric(layout_.arena_bytes(Arena::kSymmetric));  // zeroed
  MEGAMOE_CUDA_CHECK(cudaMalloc(&local_, layout_.arena_bytes(Arena::kLocal)));
  MEGAMOE_CUDA_CHECK(cudaMemset(local_, 0, layout_.arena_bytes(Arena::kLocal)));
  MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());

  moe::LayerView& v = view_;
  v.hidden = int32_t(shape.hidden);
  v.intermediate = int32_t(shape.intermediate);
  v.num_experts = int32_t(shape.num_experts);
  v.experts_per_rank = int32_t(shape.experts_per_rank());
  v.top_k = int32_t(shape.top_k);
  v.world_size = int32_t(shape.ep_size);
  v.rank = comm.rank();
  v.max_tokens = int32_t(shape.max_tokens_per_rank);
  v.pool_rows = int32_t(layout_.pool_rows());
  v.pool_windowed = layout_.windowed();
  v.scale_pitch = int32_t(layout_.scale_pitch());
  v.swiglu_limit = shape.swiglu_limit;
  v.fp8 = shape.weight_format == WeightFormat::kFp8;
  v.ws = locate_regions(layout_, symmetric_->local, local_);
  v.peers = symmetric_->peers;

  comm.host_barrier();  // no peer signals or claims before every rank's workspace reads zero
}

Workspace::~Workspace() {
  cudaDeviceSynchronize();
  if (local_) cudaFree(local_);
}

comm::DeviceBarrierView Workspace::barrier_view(double timeout_s) const {
  return comm::make_barrier_view(view_.peers, view_.ws.barrier_flags, view_.ws.device_status, view_.rank,
                                 view_.world_size, timeout_s);
}

void Workspace::reset_counters(cudaStream_t stream) const {
  MEGAMOE_CUDA_CHECK(cudaMemsetAsync(symmetric_->local, 0, layout_.zero_prefix_bytes(), stream));
}

void Workspace::reset_whole(cudaStream_t stream) const {
  reset_counters(stream);
  // Named one by one: a region added to the table is not zeroed here unless it is safe to.
  static constexpr Region kRegions[] = {Region::kRecvPairs,       Region::kTokenPool,         Region::kTokenPoolScale,
                                        Region::kPoolSource,      Region::kExpertRowOffset,   Region::kExpertTileOffset,
                                        Region::kFc1TilesDone,    Region::kFc1Out,            Region::kFc1OutScale};
  for (Region r : kRegions) {
    const RegionPlacement& p = layout_[r];
    if (p.bytes == 0) continue;
    char* base = static_cast<char*>(r == Region::kRecvPairs ? symmetric_->local : local_);
    MEGAMOE_CUDA_CHECK(cudaMemsetAsync(base + p.offset, 0, p.bytes, stream));
  }
}

}  // namespace megamoe
