#!/usr/bin/env python3
"""A DeepSeek-style MoE block in PyTorch with megamoe's expert-parallel layer for the routed experts.

    block(x) = shared_expert(x) + routed_scaling_factor * sum_k w[t,k] * expert_{id[t,k]}(x)

- router: logits = x @ W_gate^T (fp32); scores = softmax(logits) (DeepSeek-V2) or sigmoid(logits)
  with a selection bias (DeepSeek-V3: top-k of scores + bias, weights from the unbiased scores);
  the top-k weights are normalised to sum to 1, then scaled by routed_scaling_factor in the layer.
- routed experts: megamoe.torch.MoE; each rank owns E/W experts; fp8 weights (e4m3, 128x128 block
  scales) quantised from bf16 master weights (or bf16 with --weight-dtype bf16).
- shared expert: a plain SwiGLU MLP on every rank, beside the routed experts.

Run:
    torchrun --nproc_per_node 4 examples/deepseek_moe_block.py
    python3 examples/deepseek_moe_block.py            # one GPU, world size 1
    (from a checkout without `pip install ./python`: PYTHONPATH=python ...)

Prints the block's latency (CUDA graph replays timed with CUDA events, median) and its relative
error against a plain PyTorch implementation of the same block: once against the weights the layer
computes with (the dequantised fp8 weights: the layer's own error), once against the bf16 master
weights (adding fp8 quantisation error).
"""

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import megamoe  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from megamoe import reference  # noqa: E402
from megamoe.torch import MoE, quantize_weights_fp8  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=2048, help="each routed expert's FFN width")
    p.add_argument("--shared-intermediate", type=int, default=None, help="shared expert width (default: intermediate)")
    p.add_argument("--experts", type=int, default=64, help="routed experts over all ranks")
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--scoring", choices=["sigmoid", "softmax"], default="sigmoid")
    p.add_argument("--routed-scaling-factor", type=float, default=2.5)
    p.add_argument("--swiglu-limit", type=float, default=0.0, help="> 0: DeepSeek-V4's SwiGLU clamp")
    p.add_argument("--weight-dtype", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--num-sms", type=int, default=None, help="SMs the routed layer may use (default: all)")
    p.add_argument("--iters", type=int, default=50, help="timed graph replays")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def init_distributed():
    """torchrun's environment (one GPU per rank), or a single process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DeepSeekMoEBlock:
    """Router + shared expert in PyTorch, routed experts in megamoe (this rank's E/W of them)."""

    def __init__(self, args, rank, world):
        H, I, E = args.hidden, args.intermediate, args.experts
        Is = args.shared_intermediate or I
        self.args = args
        self.top_k = args.top_k
        dev = torch.device("cuda", torch.cuda.current_device())
        # Same seed on every rank: every rank builds the same full model, then keeps its experts.
        g = torch.Generator(device=dev)
        g.manual_seed(args.seed)

        def uniform(shape, fan_in):
            return ((torch.rand(shape, generator=g, device=dev) * 2 - 1) / math.sqrt(fan_in)).to(torch.bfloat16)

        self.w_gate = uniform((E, H), H).float()                       # router, fp32 as in DeepSeek
        self.score_bias = (torch.rand(E, generator=g, device=dev) - 0.5) * 0.1  # V3's e_score_correction_bias
        self.shared_w1 = uniform((2 * Is, H), H)                       # gate rows, then up rows
        self.shared_w2 = uniform((H, Is), Is)
        # bf16 master weights of every routed expert (checkpoint layout); this rank loads its slice.
        self.w13 = uniform((E, 2 * I, H), H)
        self.w2 = uniform((E, H, I), I)
        self.swiglu_limit = args.swiglu_limit

        self.moe = MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=args.top_k,
                       max_tokens_per_rank=args.tokens, weight_dtype=args.weight_dtype,
                       swiglu_limit=args.swiglu_limit, num_sms=args.num_sms)
        first, count = self.moe.first_expert, self.moe.experts_per_rank
        if args.weight_dtype == "fp8":
            # DeepSeek's fp8 checkpoint format, made from the master weights by the library.
            q13, s13 = quantize_weights_fp8(self.w13)
            q2, s2 = quantize_weights_fp8(self.w2)
            self.moe.load_weights(q13[first:first + count].contiguous(), q2[first:first + count].contiguous(),
                                  s13[first:first + count].contiguous(), s2[first:first + count].contiguous())
            # What the layer computes with, for the reference.
            self.w13_used = reference.dequantize_blocks_fp8(q13, s13)
            self.w2_used = reference.dequantize_blocks_fp8(q2, s2)
        else:
            self.moe.load_weights(self.w13[first:first + count].contiguous(), self.w2[first:first + count].contiguous())
            self.w13_used, self.w2_used = self.w13.float(), self.w2.float()

    def route(self, x):
        logits = x.float() @ self.w_gate.t()
        if self.args.scoring == "softmax":
            scores = logits.softmax(dim=-1)
            weights, ids = scores.topk(self.top_k, dim=-1)
        else:
            scores = logits.sigmoid()
            ids = (scores + self.score_bias).topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.contiguous()  # ids: int64, passed to the layer as they are

    def shared_expert(self, x):
        gate_up = x @ self.shared_w1.t()
        Is = self.shared_w2.shape[1]
        return (F.silu(gate_up[:, :Is]) * gate_up[:, Is:]) @ self.shared_w2.t()

    def forward(self, x):
        ids, weights = self.route(x)
        routed = self.moe.forward(x, ids, weights, routed_scaling_factor=self.args.routed_scaling_factor)
        return self.shared_expert(x) + routed

    @torch.no_grad()
    def forward_reference(self, x, w13, w2):
        """The same block in plain PyTorch (fp64 experts, every expert on this rank)."""
        ids, weights = self.route(x)
        routed = reference.moe_forward(x, ids, weights, w13, w2, swiglu_limit=self.swiglu_limit,
                                       routed_scaling_factor=self.args.routed_scaling_factor, round_like_gpu=False)
        return self.shared_expert(x).float() + routed


def relative_error(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def main():
    args = parse_args()
    rank, world = init_distributed()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda", torch.cuda.current_device())
    block = DeepSeekMoEBlock(args, rank, world)

    # This rank's tokens: different on every rank.
    g = torch.Generator(device=dev)
    g.manual_seed(args.seed + 1 + rank)
    x_static = ((torch.rand((args.tokens, args.hidden), generator=g, device=dev) * 2 - 1)).to(torch.bfloat16)

    y_eager = block.forward(x_static)
    torch.cuda.synchronize()
    block.moe.check_errors()

    # One CUDA graph for the whole block: router, shared expert and the routed layer.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            block.forward(x_static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = block.forward(x_static)
    graph.replay()
    torch.cuda.synchronize()
    block.moe.check_errors()
    graph_matches = torch.equal(y_graph, y_eager)

    if world > 1:
        dist.barrier()
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    block.moe.check_errors()
    latency_us = statistics.median(times)

    err_used = relative_error(y_graph, block.forward_reference(x_static, block.w13_used, block.w2_used))
    err_master = relative_error(y_graph, block.forward_reference(x_static, block.w13, block.w2))

    stats = torch.tensor([latency_us, err_used, err_master, 0.0 if graph_matches else 1.0], device=dev,
                         dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        a = args
        print("DeepSeek MoE block: H=%d I=%d E=%d K=%d, %d tokens/rank, %d rank(s), %s routed weights, %s router, "
              "routed_scaling_factor=%g%s" % (a.hidden, a.intermediate, a.experts, a.top_k, a.tokens, world,
                                               a.weight_dtype, a.scoring, a.routed_scaling_factor,
                                               ", swiglu_limit=%g" % a.swiglu_limit if a.swiglu_limit else ""))
        print("  latency (CUDA graph replay, median of %d, slowest rank): %.1f us" % (a.iters, stats[0].item()))
        print("  relative error vs PyTorch, same weights as the layer: %.3e%s"
              % (stats[1].item(), " (the layer also rounds activations to fp8)" if a.weight_dtype == "fp8" else ""))
        if a.weight_dtype == "fp8":
            print("  relative error vs PyTorch, bf16 master weights:     %.3e" % stats[2].item())
        print("  graph replay bit-identical to eager: %s" % ("yes" if stats[3].item() == 0 else "NO"))
    del graph
    block.moe.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
