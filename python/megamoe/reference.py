"""A plain PyTorch reference of the MoE layer and of DeepSeek's fp8 block format (imports torch).

Independent of libmegamoe.so: the oracle of the Python tests and the example. It mirrors the
rounding points of the GPU layer (include/megamoe/reference.h): the SwiGLU output rounded to bf16,
then (fp8) quantised per 1x128 block; each expert's FC2 row rounded to bf16 before the weighted sum.
"""

from typing import Tuple

import torch

FP8_MAX = 448.0  # largest finite e4m3 (float8_e4m3fn)


def quantize_blocks_fp8(t: torch.Tensor, block_rows: int, block_cols: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """t [..., R, C] -> (e4m3 [..., R, C], fp32 scales [..., R/block_rows, C/block_cols]):
    scale = amax / 448 of each block in fp32 (1 for an all-zero block), q = e4m3(t / scale) rounded
    to nearest even. Weights use 128 x 128 blocks, activations 1 x 128."""
    *lead, rows, cols = t.shape
    if rows % block_rows or cols % block_cols:
        raise ValueError("shape %s: not a multiple of the %dx%d block" % (list(t.shape), block_rows, block_cols))
    v = t.float().reshape(*lead, rows // block_rows, block_rows, cols // block_cols, block_cols)
    amax = v.abs().amax(dim=(-3, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (v / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*lead, rows, cols), scale.reshape(*lead, rows // block_rows, cols // block_cols)


def dequantize_blocks_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 values of an e4m3 tensor [..., R, C] with block scales [..., R/br, C/bc]."""
    *lead, rows, cols = q.shape
    br, bc = rows // scale.shape[-2], cols // scale.shape[-1]
    v = q.float().reshape(*lead, rows // br, br, cols // bc, bc)
    s = scale.float().reshape(*lead, rows // br, 1, cols // bc, 1)
    return (v * s).reshape(*lead, rows, cols)


def round_fp8_rows(t: torch.Tensor) -> torch.Tensor:
    """t [N, C] rounded to e4m3 per 1 x 128 block (as fp32 values): how an fp8 layer sees activations."""
    q, s = quantize_blocks_fp8(t, 1, 128)
    return dequantize_blocks_fp8(q, s)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(min(gate, L)) * clamp(up, -L, L) for limit L > 0; silu(gate) * up otherwise."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(gate) * up


@torch.no_grad()
def moe_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, *, first_expert: int = 0, swiglu_limit: float = 0.0,
                routed_scaling_factor: float = 1.0, fp8_activations: bool = False, round_like_gpu: bool = True,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y [T, H] fp32 = routed_scaling_factor * sum_k w[t, k] * W2_e(swiglu(W1gate_e x, W1up_e x)).

    x [T, H] (any float dtype; already dequantised when the layer gets fp8 x); topk_ids [T, K]
    global ids, slots outside [first_expert, first_expert + w13.shape[0]) contribute nothing (-1,
    bad ids, experts held elsewhere); topk_weights [T, K]; w13 [E, 2I, H], w2 [E, H, I] as the GEMMs
    see them (dequantised for fp8). fp8_activations: x and the SwiGLU output are rounded to e4m3 per
    1x128 block as an fp8 layer does. GEMMs in `dtype` (fp64: no TF32, no accumulation-order noise)."""
    tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    xs = round_fp8_rows(x) if fp8_activations else x.float()
    xs = xs.to(dtype)
    y = torch.zeros((tokens, hidden), dtype=dtype, device=x.device)
    local = topk_ids.long() - first_expert
    for e in torch.unique(local).tolist():
        if e < 0 or e >= num_experts:
            continue
        t, k = (local == e).nonzero(as_tuple=True)
        gate_up = xs[t] @ w13[e].to(dtype).t()
        h = swiglu(gate_up[:, :inter], gate_up[:, inter:], swiglu_limit)
        if round_like_gpu:
            h = h.float().bfloat16().to(dtype)
        if fp8_activations:
            h = round_fp8_rows(h.float()).to(dtype)
        out = h @ w2[e].to(dtype).t()
        if round_like_gpu:
            out = out.float().bfloat16().to(dtype)
        y.index_add_(0, t, out * topk_weights[t, k].to(dtype).unsqueeze(1))
    return (y * routed_scaling_factor).float()


def per_token_relative_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||y[t] - ref[t]|| / ||ref[t]|| per token (fp64; inf where ref[t] = 0 but y[t] != 0, 0 where both are 0)."""
    y = y.double()
    ref = ref.double()
    num = (y - ref).norm(dim=1)
    den = ref.norm(dim=1)
    out = num / den.clamp_min(torch.finfo(torch.float64).tiny)
    out = torch.where(den > 0, out, torch.where(num > 0, torch.full_like(out, float("inf")), torch.zeros_like(out)))
    return torch.where(torch.isnan(y).any(dim=1), torch.full_like(out, float("nan")), out)
