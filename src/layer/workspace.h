// A layer's workspace on one rank: the WorkspaceLayout allocated once (symmetric arena in an NCCL
// window, local arena in device memory) and every kernel-side pointer computed from it once.
#pragma once
#include <memory>

#include "kernels/layer_view.h"
#include "megamoe/communicator.h"
#include "megamoe/layout.h"
#include "runtime/device_barrier.h"

namespace megamoe {

class Workspace {
 public:
  // Collective. Both arenas are zeroed; returns after every rank has zeroed its own.
  Workspace(const MoeShape& shape, Communicator& comm);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  const WorkspaceLayout& layout() const { return layout_; }
  const kernels::LayerView& view() const { return view_; }
  DeviceBarrierView barrier_view(double timeout_s) const;
  DeviceStatus* status() const { return view_.status; }

  // Enqueues the per-forward reset: one memset of the symmetric arena's must-zero prefix.
  void reset_counters(cudaStream_t stream) const;

 private:
  WorkspaceLayout layout_;
  std::unique_ptr<SymmetricBuffer> symmetric_;
  void* local_ = nullptr;
  kernels::LayerView view_{};
  int rank_, world_size_;
};

}  // namespace megamoe
