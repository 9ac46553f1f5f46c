// A layer's workspace on one rank: the WorkspaceLayout allocated once (symmetric arena through the
// communicator, local arena in device memory) and the kernels' view of it, derived from the table.
#pragma once
#include <memory>

#include "comm/barrier.h"
#include "megamoe/communicator.h"
#include "megamoe/layout.h"
#include "moe/layer_view.h"

namespace megamoe {

class Workspace {
 public:
  // Collective. Both arenas are zeroed; returns after every rank has zeroed its own. pool_rows as
  // for WorkspaceLayout.
  Workspace(const MoeShape& shape, Communicator& comm, int64_t pool_rows);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  const WorkspaceLayout& layout() const { return layout_; }
  const moe::LayerView& view() const { return view_; }
  comm::DeviceBarrierView barrier_view(double timeout_s) const;
  DeviceStatus* status() const { return view_.ws.device_status; }

  // Enqueues the per-forward reset: one memset of the symmetric arena's must-zero prefix.
  void reset_counters(cudaStream_t stream) const;
  // The zero_whole_workspace ablation: the prefix, the received pairs and the local regions before
  // the device status (pool, schedule, FC1 output), everything no peer touches after this rank's FC2.
  void reset_whole(cudaStream_t stream) const;
  // That prefix, for kernels that zero it themselves (the fused forward).
  int32_t* zero_prefix() const { return static_cast<int32_t*>(symmetric_->local); }
  size_t zero_prefix_bytes() const { return layout_.zero_prefix_bytes(); }

 private:
  WorkspaceLayout layout_;
  std::unique_ptr<SymmetricBuffer> symmetric_;
  void* local_ = nullptr;
  moe::LayerView view_{};
};

}  // namespace megamoe
