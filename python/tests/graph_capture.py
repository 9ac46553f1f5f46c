"""CUDA-graph capture for the GPU tests (imported once PyTorch and a GPU are known to be there)."""

import torch


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
