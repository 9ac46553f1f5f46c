// Ranks: one process per GPU. A program either spawns one child per GPU itself, or joins a job that
// torchrun / mpirun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, or the
// OMPI_COMM_WORLD_* variables).
#pragma once
#include <functional>
#include <optional>
#include <string>

namespace megamoe {

struct RankEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;           // the GPU this rank uses
  std::string master_addr = "127.0.0.1";
  int bootstrap_port = 0;       // TCP port where rank 0 hands out the NCCL unique id
  bool spawned_by_us = false;   // a child of run_ranks (the parent prefixes its output)
};

// The rank environment from the process environment, or nullopt when this process is not part of a
// multi-process job. Bootstrap port: MEGAMOE_BOOTSTRAP_PORT if set; else MASTER_PORT for our own
// children; else MASTER_PORT + 1 (torchrun's store already listens on MASTER_PORT); else 29533.
// Throws InvalidArgument naming the variable when one is malformed.
std::optional<RankEnv> rank_env_from_environment();

// Runs `body` once per rank and returns the process exit code.
// - Inside a torchrun/mpirun job (or in one of our children): runs body for this rank.
// - Otherwise: with num_gpus <= 1, runs body inline as rank 0 of 1; with more, re-executes this
//   program once per GPU with the rank variables set, prefixes every line of each child's output
//   with "[rank r] ", and if any child fails, stops the others and fails with that rank's message.
// Exit codes: 0 if every rank returned 0; 77 if every rank returned 77 (skipped); else the first
// failing rank's code (1 if it died of a signal).
int run_ranks(int argc, char** argv, int num_gpus, const std::function<int(const RankEnv&)>& body);

// Number of visible CUDA devices (0 when there is no driver or no device).
int visible_gpu_count();

// Sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 for this
// process and the children it starts: megamoe never uses NVLink multicast, and neither may anything
// it shares a process with. Called by every NCCL communicator constructor and by our programs' main.
void disable_nvlink_multicast();

// GPUs this process runs ranks on: inside a torchrun/mpirun job (or in a child of run_ranks) 1, the
// GPU of its LOCAL_RANK; otherwise every visible GPU. 0 when it has none, with `why_none` (when
// given) set to one line for the user: no GPU is visible, or LOCAL_RANK names a GPU that is not.
// Programs ask this before run_ranks, so that a job on a machine without a GPU fails with that
// line instead of a CUDA error from every rank.
int gpus_for_this_process(std::string* why_none = nullptr);

// "[rank r] " prefix for this process's own log lines when the parent does not add one.
std::string log_prefix(const RankEnv& env);

}  // namespace megamoe
