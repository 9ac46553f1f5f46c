"""What the GPU tests of the torch layer share (imported once PyTorch and a GPU are known to be there):
random data, the experts' weights with what the layer computes with, CUDA-graph capture."""

import math

import torch

from megamoe import reference as ref


def uniform(gen, shape, scale=1.0, dtype=torch.bfloat16):
    """Uniform in [-scale, scale), on the generator's device."""
    return ((torch.rand(shape, generator=gen, device=gen.device) * 2 - 1) * scale).to(dtype)


class ExpertWeights:
    """Random bf16 master weights of all experts (the same on every rank for the same generator
    state; checkpoint layout: w13 gate rows then up rows) and what the layer computes with: the same,
    or for fp8 their 128 x 128 block quantisation dequantised."""

    def __init__(self, gen, fp8, experts, hidden, intermediate):
        self.w13 = uniform(gen, (experts, 2 * intermediate, hidden), 1 / math.sqrt(hidden))
        self.w2 = uniform(gen, (experts, hidden, intermediate), 1 / math.sqrt(intermediate))
        self.fp8 = fp8
        if fp8:
            self.q13, self.s13 = ref.quantize_blocks_fp8(self.w13, 128, 128)
            self.q2, self.s2 = ref.quantize_blocks_fp8(self.w2, 128, 128)
            self.ref13 = ref.dequantize_blocks_fp8(self.q13, self.s13)
            self.ref2 = ref.dequantize_blocks_fp8(self.q2, self.s2)
        else:
            self.ref13, self.ref2 = self.w13, self.w2

    def load(self, layer, as_bf16=False):
        """Loads the layer's own experts (all of them at world size 1); bf16 into an fp8 layer with as_bf16."""
        mine = slice(layer.first_expert, layer.first_expert + layer.experts_per_rank)
        if self.fp8 and not as_bf16:
            layer.load_weights(self.q13[mine].contiguous(), self.q2[mine].contiguous(), self.s13[mine].contiguous(),
                               self.s2[mine].contiguous())
        else:
            layer.load_weights(self.w13[mine].contiguous(), self.w2[mine].contiguous())


def capture(fn):
    """Captures fn() (after one warm-up call on a side stream) and returns (graph, its output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
