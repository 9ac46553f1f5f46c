#include "layer/workspace.h"

#include "runtime/cuda_check.h"

namespace megamoe {

Workspace::Workspace(const MoeShape& shape, Communicator& comm)
    : layout_(shape), rank_(comm.rank()), world_size_(comm.world_size()) {
  if (shape.ep_size != comm.world_size())
    throw InvalidArgument("shape.ep_size = " + std::to_string(shape.ep_size) + ": must equal the number of ranks (" +
                          std::to_string(comm.world_size()) + ")");
  symmetric_ = comm.allocate_symmetric(layout_.arena_bytes(Arena::kSymmetric));  // zeroed
  MEGAMOE_CUDA_CHECK(cudaMalloc(&local_, layout_.arena_bytes(Arena::kLocal)));
  MEGAMOE_CUDA_CHECK(cudaMemset(local_, 0, layout_.arena_bytes(Arena::kLocal)));
  MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());

  char* sym = static_cast<char*>(symmetric_->local);
  char* loc = static_cast<char*>(local_);
  auto at = [&](Region r) { return (layout_[r].bytes ? (workspace_table()[int(r)].arena == Arena::kSymmetric ? sym : loc) + layout_[r].offset : nullptr); };
  kernels::LayerView& v = view_;
  v.hidden = int32_t(shape.hidden);
  v.intermediate = int32_t(shape.intermediate);
  v.num_experts = int32_t(shape.num_experts);
  v.experts_per_rank = int32_t(shape.experts_per_rank());
  v.top_k = int32_t(shape.top_k);
  v.world_size = int32_t(shape.ep_size);
  v.rank = comm.rank();
  v.max_tokens = int32_t(shape.max_tokens_per_rank);
  v.pool_rows = int32_t(layout_.pool_rows());
  v.swiglu_limit = shape.swiglu_limit;
  v.expert_recv_count = reinterpret_cast<int32_t*>(at(Region::kExpertRecvCount));
  v.send_pair_count = reinterpret_cast<int32_t*>(at(Region::kSendPairCount));
  v.dispatch_done_ctas = reinterpret_cast<int32_t*>(at(Region::kDispatchDoneCtas));
  v.expert_arrived_rows = reinterpret_cast<int32_t*>(at(Region::kExpertArrivedRows));
  v.source_pair_count = reinterpret_cast<int32_t*>(at(Region::kSourcePairCount));
  v.recv_pairs = reinterpret_cast<int4*>(at(Region::kRecvPairs));
  v.token_staging = reinterpret_cast<__nv_bfloat16*>(at(Region::kTokenStaging));
  v.combine_recv = reinterpret_cast<__nv_bfloat16*>(at(Region::kCombineRecv));
  v.token_pool = reinterpret_cast<__nv_bfloat16*>(at(Region::kTokenPool));
  v.pool_source = reinterpret_cast<int2*>(at(Region::kPoolSource));
  v.expert_row_offset = reinterpret_cast<int32_t*>(at(Region::kExpertRowOffset));
  v.expert_tile_offset = reinterpret_cast<int32_t*>(at(Region::kExpertTileOffset));
  v.fc1_out = reinterpret_cast<__nv_bfloat16*>(at(Region::kFc1Out));
  v.status = reinterpret_cast<DeviceStatus*>(at(Region::kDeviceStatus));
  v.symmetric = symmetric_->peers;
  v.expert_recv_count_offset = layout_[Region::kExpertRecvCount].offset;
  v.source_pair_count_offset = layout_[Region::kSourcePairCount].offset;
  v.recv_pairs_offset = layout_[Region::kRecvPairs].offset;
  v.token_staging_offset = layout_[Region::kTokenStaging].offset;
  v.combine_recv_offset = layout_[Region::kCombineRecv].offset;

  comm.host_barrier();  // no peer signals or claims before every rank's workspace reads zero
}

Workspace::~Workspace() {
  cudaDeviceSynchronize();
  if (local_) cudaFree(local_);
}

DeviceBarrierView Workspace::barrier_view(double timeout_s) const {
  return make_barrier_view(symmetric_->peers, layout_[Region::kBarrierFlags].offset, view_.status, rank_, world_size_,
                           timeout_s);
}

void Workspace::reset_counters(cudaStream_t stream) const {
  MEGAMOE_CUDA_CHECK(cudaMemsetAsync(symmetric_->local, 0, layout_.zero_prefix_bytes(), stream));
}

}  // namespace megamoe
