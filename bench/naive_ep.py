#!/usr/bin/env python3
"""Naive PyTorch expert-parallel MoE layer: the baseline megamoe is measured against.

This is the layer a user would write today with stock PyTorch collectives and
kernels, one process per GPU:

  1. order the (token, k) pairs by destination rank, exchange the per-rank
     counts with all_to_all_single and read them on the host (a host sync);
  2. all_to_all_single the token rows (bf16, one row per pair) and their
     local expert ids;
  3. sort the received rows by local expert; FC1 with torch._grouped_mm,
     SwiGLU silu(gate) * up, FC2 with torch._grouped_mm;
  4. unsort and all_to_all_single the rows back;
  5. y[t] = sum_k w[t,k] * row[t,k], accumulated in fp32, stored bf16.

--dtype fp8 (impl "naive_torch_fp8") is the same layer with FP8 experts, as a
user would write it with stock PyTorch today: identical dispatch and combine
(bf16 rows on the wire, the same host sync), then the received rows are
quantised to e4m3 with one fp32 scale per row, FC1 and FC2 run as
torch._scaled_grouped_mm with rowwise scales (weights quantised once at setup,
one fp32 scale per output channel), SwiGLU in fp32 in between, and the SwiGLU
output is re-quantised rowwise for FC2.  Needs an SM90/SM100 GPU.

Launch:
  torchrun --standalone --nproc_per_node W bench/naive_ep.py \
      --preset dsv4-flash --tokens 1,64,512,1024,2048,4096,8192 --json out.jsonl
  (add --dtype fp8 for the FP8 baseline)

CPU debugging (gloo backend, tiny shapes):
  torchrun --standalone --nproc_per_node 2 bench/naive_ep.py \
      --preset tiny --tokens 1,16,64 --device cpu
"""

import os

# NVLink multicast must stay off on the shared GPU hosts. Set before
# torch.distributed (and NCCL) is initialised.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# name: (hidden H, intermediate I, experts E, top-k K)
PRESETS = {
    "dsv3": (7168, 2048, 256, 8),
    "dsv4-flash": (4096, 2048, 256, 6),
    "dsv4-pro": (7168, 3072, 384, 6),
    "tiny": (256, 128, 16, 4),
}

REL_TOL = 2e-2
# FP8 tolerance.  Rowwise e4m3 keeps 3 mantissa bits (relative rounding error
# up to 2^-4, ~2.7% rms), and this layer rounds four operands (x, w1, SwiGLU
# output, w2) before the fp32 reference's math.  A NumPy emulation of exactly
# this pipeline on the presets' shapes (random data, same weight scaling)
# gives a per-token relative L2 error of 0.064-0.067 on average and at most
# 0.092 over 400 tokens (tiny preset, the noisiest); 6e-2 would fail on
# correct code.  0.12 leaves headroom while still catching real bugs (a wrong
# scale, expert or row permutation gives errors of order 1).
FP8_REL_TOL = 0.12
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def log0(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def fail(msg):
    print(f"[rank {dist.get_rank()}] FAIL: {msg}", file=sys.stderr, flush=True)
    # Every rank reaches the same verdict (the check is computed from
    # all-gathered data), so exiting here does not strand a peer in a collective.
    dist.destroy_process_group()
    sys.exit(1)


# --------------------------------------------------------------------------
# Grouped GEMM
#
# torch._grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None)
# (ATen: aten/src/ATen/native/GroupedMMUtils.h, cuda/GroupedBlas.cpp,
#  cuda/GroupMM.cu, cuda/GroupMMCommon.cuh).  The "2d x 3d" MoE form:
#   mat_a [M_total, K] row-major bf16, mat_b [G, K, N] bf16,
#   offs  [G] int32 = cumulative END row of each group (offs[-1] <= M_total;
#         rows past offs[-1] are left unwritten in the output);
#   out   [M_total, N] bf16 (out dtype must equal mat_a's).
# mat_b may be a transposed view: our weights are stored like nn.Linear,
# [G, N, K], and we pass w.transpose(-2, -1) (column-major [G, K, N]); the
# kernel dispatches on the strides, no copy is made.
# Constraints: data_ptr 16-byte aligned and the non-unit stride a multiple of
# 16 bytes (K and N multiples of 8 for bf16 -- all presets qualify), fewer
# than 1024 groups, bf16 fast path needs SM90/SM100 (else ATen loops over
# mm itself).  For 2d x 3d with a row-major A the per-group row counts are
# the dynamic dimension and carry NO alignment requirement: the kernel's
# device-side alignment asserts only cover the 2d x 2d (K) and 3d x 2d (N)
# forms, and empty groups are accepted.  So we do not pad groups; the
# --group-align option exists only as a fallback should a build disagree.
# --------------------------------------------------------------------------


def probe_grouped_mm(device):
    """Return (ok, why): does torch._grouped_mm run and agree with mm here?"""
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm does not exist in this torch"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(40, 64, generator=g).to(device, torch.bfloat16)
        w = torch.randn(3, 32, 64, generator=g).to(device, torch.bfloat16)  # [G, N, K]
        sizes = [16, 0, 24]  # includes an empty group and a non-multiple-of-16 one
        offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        out = torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
        ref = torch.empty_like(out)
        start = 0
        for gi, n in enumerate(sizes):
            ref[start:start + n] = (a[start:start + n].float() @ w[gi].float().t()).to(torch.bfloat16)
            start += n
        err = (out.float() - ref.float()).norm() / ref.float().norm()
        if not torch.isfinite(err) or err.item() > 1e-2:
            return False, f"torch._grouped_mm disagrees with mm (rel err {err.item():.3g})"
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means "use the loop"
        return False, f"torch._grouped_mm failed: {type(exc).__name__}: {exc}"


class ExpertMLP:
    """The local experts' weights and the two grouped GEMMs."""

    def __init__(self, H, I, E_local, device, seed, use_grouped):
        self.H, self.I, self.E_local = H, I, E_local
        self.use_grouped = use_grouped
        g = torch.Generator(device=device).manual_seed(seed)
        # w1: [E_local, 2I, H], gate rows then up rows; w2: [E_local, H, I].
        # Drawn straight in bf16 (no fp32 temporary), scaled ~ 1/sqrt(fan_in).
        self.w1 = torch.randn(E_local, 2 * I, H, generator=g, device=device, dtype=torch.bfloat16)
        self.w1.mul_(1.0 / math.sqrt(H))
        self.w2 = torch.randn(E_local, H, I, generator=g, device=device, dtype=torch.bfloat16)
        self.w2.mul_(1.0 / math.sqrt(I))
        # [G, K, N] views of the [G, N, K] weights (column-major operands).
        self.w1_t = self.w1.transpose(-2, -1)
        self.w2_t = self.w2.transpose(-2, -1)

    def _gemm(self, a, w_t, w, offs, counts_host):
        if self.use_grouped:
            return torch._grouped_mm(a, w_t, offs=offs)
        # Fallback: one mm per non-empty expert (needs host-side counts).
        out = a.new_empty(a.shape[0], w.shape[1])
        start = 0
        for e, n in enumerate(counts_host):
            if n:
                torch.mm(a[start:start + n], w_t[e], out=out[start:start + n])
            start += n
        return out

    def forward(self, xs, offs, counts_host):
        """xs: rows sorted by local expert; offs: int32 cumulative ends."""
        I = self.I
        h1 = self._gemm(xs, self.w1_t, self.w1, offs, counts_host)  # [R, 2I]
        act = F.silu(h1[:, :I]) * h1[:, I:]  # [R, I] bf16
        return self._gemm(act, self.w2_t, self.w2, offs, counts_host)  # [R, H]


# --------------------------------------------------------------------------
# FP8 (e4m3, rowwise scales) grouped GEMM
#
# torch._scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None,
#                          bias=None, scale_result=None, out_dtype=None,
#                          use_fast_accum=False)
# (ATen: aten/src/ATen/native/cuda/GroupedBlas.cpp, _scaled_grouped_mm_cuda;
#  cuda/ScaledGroupMM.cu, f8f8bf16_grouped_mm, CUTLASS SM90 kernel;
#  cuda/GroupMMCommon.cuh, prepare_grouped_gemm_data; usage as in
#  test/test_scaled_matmul_cuda.py, test_scaled_grouped_gemm_2d_3d.)
# The "2d x 3d" MoE form, rowwise ("per row of A, per output column of B"):
#   mat_a   [M_total, K] float8_e4m3fn, row-major (must NOT be transposed);
#   mat_b   [G, K, N]    float8_e4m3fn, column-major (MUST be transposed):
#           the transpose(-2, -1) view of a contiguous [G, N, K] tensor;
#   scale_a [M_total]    fp32, contiguous (1-D: one per row of mat_a);
#   scale_b [G, N]       fp32, last dim contiguous (one per row of [G, N, K]);
#   offs    [G] int32    cumulative END row of each group (required here);
#   out     [M_total, N] bf16, out[r, n] = scale_a[r] * scale_b[g, n] *
#           sum_k a[r, k] b[g, k, n], accumulated in fp32 (rows past offs[-1]
#           are left unwritten).  out_dtype must be bf16; bias and
#           scale_result must be None.
# Host-side checks: K % 16 == 0 and N % 16 == 0 (every preset qualifies),
# fewer than 1024 groups, SM90 / SM100 only.  Per-group row counts: the 2d x 3d
# row-major-A form has no alignment assert (the device-side "multiple of 16
# bytes" asserts cover only the 2d x 2d and 3d x 2d forms) and empty groups
# are accepted -- but PyTorch's own tests only use groups of 16 rows, so this
# script does not take it on trust: probe_scaled_grouped_mm() tries
# unaligned groups at start-up; if they fail and 16-row groups work, every
# expert's rows are padded (zero rows, on the device, no extra host sync) to a
# multiple of 16 (--group-align 16 forces that from the start).
#
# Fallback if _scaled_grouped_mm is missing or fails: one torch._scaled_mm per
# non-empty expert (needs the group sizes on the host: one more sync):
#   torch._scaled_mm(a [M, K] e4m3 row-major, b [K, N] e4m3 column-major,
#                    scale_a=[M, 1] fp32, scale_b=[1, N] fp32,
#                    out_dtype=torch.bfloat16, use_fast_accum=...)
# (rowwise recipe: both scales 2-D and contiguous; K, N multiples of 16.)
# --------------------------------------------------------------------------


def quantize_rows(x):
    """Rowwise e4m3: x [..., K] -> (q [..., K] float8_e4m3fn, scale [...] fp32).

    x ~= q * scale[..., None]; scale is the dequantisation multiplier the
    scaled GEMMs take (amax / 448).  All-zero rows get a tiny scale and q = 0.
    """
    amax = x.abs().amax(dim=-1).float()
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    q = (x.float() / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_weights(w):
    """[E, N, K] bf16 -> ([E, N, K] e4m3, [E, N] fp32), one expert at a time
    (an fp32 temporary of the whole stack would not fit for the big presets)."""
    E, N, K = w.shape
    q = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(E, N, dtype=torch.float32, device=w.device)
    q_bytes = q.view(torch.uint8)
    for e in range(E):
        qe, se = quantize_rows(w[e])
        q_bytes[e].copy_(qe.view(torch.uint8))
        s[e].copy_(se)
    return q, s


def _fp8_probe_operands(device, sizes, K=64, N=48, extra_rows=8):
    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(sum(sizes) + extra_rows, K, generator=g).to(device)  # rows past offs[-1] too
    w = torch.randn(len(sizes), N, K, generator=g).to(device)
    qa, sa = quantize_rows(a)
    qw, sw = quantize_rows(w)  # [G, N, K], [G, N]
    ref = torch.zeros(sum(sizes), N, dtype=torch.float32, device=device)
    start = 0
    for gi, n in enumerate(sizes):
        deq_a = qa[start:start + n].float() * sa[start:start + n].unsqueeze(1)
        deq_w = qw[gi].float() * sw[gi].unsqueeze(1)
        ref[start:start + n] = deq_a @ deq_w.t()
        start += n
    return qa, sa, qw, sw, ref


def _probe_err(out, ref):
    err = (out[:ref.shape[0]].float() - ref).norm() / ref.norm()
    return err.item() if torch.isfinite(err) else float("inf")


FP8_PROBE_UNALIGNED = [16, 0, 24, 5, 19]  # an empty group, counts not multiples of 16
FP8_PROBE_ALIGNED = [16, 0, 32, 48]


def probe_scaled_grouped_mm(device, sizes, fast_accum):
    """Return (ok, why): does torch._scaled_grouped_mm (2d x 3d, rowwise) run
    and agree with a dequantised fp32 matmul for these group sizes?"""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False, "torch._scaled_grouped_mm does not exist in this torch"
    try:
        qa, sa, qw, sw, ref = _fp8_probe_operands(device, sizes)
        offs = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        out = torch._scaled_grouped_mm(qa, qw.transpose(-2, -1), sa, sw, offs=offs,
                                       out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        err = _probe_err(out, ref)
        if not err <= 1e-2:
            return False, f"torch._scaled_grouped_mm disagrees with the reference (rel err {err:.3g}, groups {sizes})"
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means "try the next option"
        return False, f"torch._scaled_grouped_mm failed (groups {sizes}): {type(exc).__name__}: {exc}"


def probe_scaled_mm(device, fast_accum):
    """Return (ok, why): does the per-expert torch._scaled_mm loop (rowwise) work?"""
    if not hasattr(torch, "_scaled_mm"):
        return False, "torch._scaled_mm does not exist in this torch"
    try:
        sizes = FP8_PROBE_UNALIGNED
        qa, sa, qw, sw, ref = _fp8_probe_operands(device, sizes)
        out = scaled_mm_loop(qa, sa, qw.transpose(-2, -1), sw, sizes, fast_accum)
        err = _probe_err(out, ref)
        if not err <= 1e-2:
            return False, f"torch._scaled_mm disagrees with the reference (rel err {err:.3g})"
        return True, ""
    except Exception as exc:  # noqa: BLE001
        return False, f"torch._scaled_mm failed: {type(exc).__name__}: {exc}"


def scaled_mm_loop(q, s, wq_t, ws, counts_host, fast_accum):
    """Fallback grouped GEMM: one rowwise torch._scaled_mm per non-empty group."""
    out = torch.empty(q.shape[0], wq_t.shape[2], dtype=torch.bfloat16, device=q.device)
    start = 0
    for e, n in enumerate(counts_host):
        if n:
            out[start:start + n] = torch._scaled_mm(
                q[start:start + n], wq_t[e],
                scale_a=s[start:start + n].unsqueeze(1), scale_b=ws[e].unsqueeze(0),
                out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        start += n
    return out


class Fp8ExpertMLP(ExpertMLP):
    """The same bf16 weights as ExpertMLP (kept for the reference check) plus
    their rowwise e4m3 copies, quantised once here (not timed)."""

    def __init__(self, H, I, E_local, device, seed, use_grouped, fast_accum):
        super().__init__(H, I, E_local, device, seed, use_grouped=False)
        self.fp8_grouped = use_grouped
        self.fast_accum = fast_accum
        self.w1_q, self.w1_s = quantize_weights(self.w1)  # [E, 2I, H], [E, 2I]
        self.w2_q, self.w2_s = quantize_weights(self.w2)  # [E, H, I],  [E, H]
        self.w1_qt = self.w1_q.transpose(-2, -1)  # [E, H, 2I] column-major
        self.w2_qt = self.w2_q.transpose(-2, -1)  # [E, I, H]  column-major

    def _fp8_gemm(self, q, s, wq_t, ws, offs, counts_host):
        if self.fp8_grouped:
            return torch._scaled_grouped_mm(q, wq_t, s, ws, offs=offs,
                                            out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        return scaled_mm_loop(q, s, wq_t, ws, counts_host, self.fast_accum)

    def forward_fp8(self, q, s, offs, counts_host):
        """q [R, H] e4m3 + s [R] fp32, rows grouped by local expert; offs int32
        cumulative group ends.  Returns [R, H] bf16 (rows past offs[-1] unset)."""
        I = self.I
        h1 = self._fp8_gemm(q, s, self.w1_qt, self.w1_s, offs, counts_host)  # [R, 2I] bf16
        act = F.silu(h1[:, :I].float()) * h1[:, I:].float()  # SwiGLU in fp32
        q2, s2 = quantize_rows(act)
        return self._fp8_gemm(q2, s2, self.w2_qt, self.w2_s, offs, counts_host)  # [R, H] bf16


# --------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------


class NaiveEPLayer:
    def __init__(self, H, I, E, K, world, rank, device, seed, use_grouped, group_align,
                 dtype="bf16", fp8_fast_accum=False):
        self.H, self.I, self.E, self.K = H, I, E, K
        self.W, self.rank = world, rank
        self.E_local = E // world
        self.device = device
        self.group_align = group_align
        self.dtype = dtype
        if dtype == "fp8":
            # Same seed, so the same bf16 weights as the bf16 layer, then quantised.
            # use_grouped: torch._scaled_grouped_mm, else a torch._scaled_mm loop.
            self.mlp = Fp8ExpertMLP(H, I, self.E_local, device, seed * 1000 + rank,
                                    use_grouped, fp8_fast_accum)
            # The fp8 padding is done on the device; only the loop needs host sizes.
            self.need_host_counts = not use_grouped
            return
        self.mlp = ExpertMLP(H, I, self.E_local, device, seed * 1000 + rank, use_grouped)
        # The per-expert loop needs host-side group sizes; the grouped path does not.
        self.need_host_counts = (not use_grouped) or group_align > 1

    def _a2a(self, inp, out_splits, in_splits, trailing, dtype):
        if self.W == 1:
            return inp  # a single rank exchanges nothing
        out = torch.empty((sum(out_splits),) + trailing, dtype=dtype, device=self.device)
        dist.all_to_all_single(out, inp, out_splits, in_splits)
        return out

    def forward(self, x, topk_ids, topk_w):
        T, K = topk_ids.shape
        H, W, E_local = self.H, self.W, self.E_local

        # (1) order the (t, k) pairs by destination rank; exchange the counts.
        flat_ids = topk_ids.reshape(-1)
        dest = torch.div(flat_ids, E_local, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        if W > 1:
            send_counts = torch.bincount(dest, minlength=W)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts)
            send_splits = send_counts.tolist()  # host sync, as users do
            recv_splits = recv_counts.tolist()
        else:
            send_splits = recv_splits = [T * K]

        # (2) the token rows (one per pair) and their local expert ids.
        send_x = x.index_select(0, torch.div(order, K, rounding_mode="floor"))
        send_e = (flat_ids.index_select(0, order) % E_local).to(torch.int32)
        recv_x = self._a2a(send_x, recv_splits, send_splits, (H,), x.dtype)
        recv_e = self._a2a(send_e, recv_splits, send_splits, (), torch.int32)

        # (3) sort by local expert, FC1 -> SwiGLU -> FC2.
        R = recv_x.shape[0]
        if R > 0 and self.dtype == "fp8":
            result = self._mlp_fp8(recv_x, recv_e)  # (3) and the unsort of (4)
        elif R > 0:
            perm = torch.argsort(recv_e, stable=True)
            counts = torch.bincount(recv_e, minlength=E_local)
            if self.group_align > 1:
                out_sorted = self._mlp_padded(recv_x, recv_e, perm, counts)
            else:
                xs = recv_x.index_select(0, perm)
                offs = torch.cumsum(counts, 0, dtype=torch.int32)
                counts_host = counts.tolist() if self.need_host_counts else None
                out_sorted = self.mlp.forward(xs, offs, counts_host)
            # (4) unsort, send the rows back.
            result = torch.empty_like(out_sorted)
            result.index_copy_(0, perm, out_sorted)
        else:
            result = recv_x.new_empty(0, H)
        back = self._a2a(result, send_splits, recv_splits, (H,), x.dtype)

        # (5) back[j] belongs to pair order[j]; put pairs back in (t, k) order
        # and reduce over k.  bmm accumulates in fp32 (cuBLAS bf16 GEMMs use
        # fp32 compute) and rounds once to bf16: no fp32 copy of the [T, K, H]
        # rows is ever made.  The fp32 routing weights are rounded to bf16 to
        # feed the GEMM (relative error 2^-9, the precision the rows have).
        rows = torch.empty_like(back)
        rows.index_copy_(0, order, back)
        y = torch.bmm(topk_w.to(torch.bfloat16).unsqueeze(1), rows.view(T, K, H))
        return y.view(T, H)

    def _mlp_fp8(self, recv_x, recv_e):
        """FP8 experts on the received rows; returns [R, H] bf16 in received order.

        Every received row gets a slot in the expert-sorted GEMM operand; with
        group_align a > 1 each expert's group is padded to a multiple of a rows
        (zero rows, scale 1), all on the device: the buffer is sized for the
        worst case, R + min(R, E_local) * (a - 1) rows, and the slots beyond
        offs[-1] are simply not part of any group.  GEMM rows are independent,
        so padding rows and the unwritten rows past offs[-1] never touch a
        real row.  With a == 1 the slots are the inverse of the sort permutation.
        """
        R, H, E_local, a = recv_x.shape[0], self.H, self.E_local, self.group_align
        dev = recv_x.device
        perm = torch.argsort(recv_e, stable=True)
        counts = torch.bincount(recv_e, minlength=E_local)
        padded = (counts + (a - 1)) // a * a if a > 1 else counts
        ends = torch.cumsum(padded, 0)
        e_sorted = recv_e.index_select(0, perm).long()
        rank_in_group = torch.arange(R, device=dev) - (torch.cumsum(counts, 0) - counts)[e_sorted]
        slot = torch.empty_like(perm)
        slot.index_copy_(0, perm, (ends - padded)[e_sorted] + rank_in_group)

        q, s = quantize_rows(recv_x)  # [R, H] e4m3, [R] fp32
        rows = R + min(R, E_local) * (a - 1) if a > 1 else R
        if a > 1:
            qp = torch.zeros(rows, H, dtype=torch.uint8, device=dev)
            sp = torch.ones(rows, dtype=torch.float32, device=dev)
        else:
            qp = torch.empty(rows, H, dtype=torch.uint8, device=dev)
            sp = torch.empty(rows, dtype=torch.float32, device=dev)
        # fp8 data is moved as bytes (index kernels need not support float8).
        qp.index_copy_(0, slot, q.view(torch.uint8))
        sp.index_copy_(0, slot, s)
        offs = ends.to(torch.int32)
        counts_host = padded.tolist() if self.need_host_counts else None
        out = self.mlp.forward_fp8(qp.view(torch.float8_e4m3fn), sp, offs, counts_host)
        return out.index_select(0, slot)

    def _mlp_padded(self, recv_x, recv_e, perm, counts):
        """Variant that pads every expert group to a multiple of group_align rows."""
        a = self.group_align
        counts_host = counts.tolist()
        padded = [(n + a - 1) // a * a for n in counts_host]
        starts_sorted = torch.cumsum(counts, 0) - counts  # unpadded group starts
        pstarts = torch.tensor([sum(padded[:e]) for e in range(len(padded))],
                               dtype=torch.int64, device=recv_x.device)
        e_sorted = recv_e.index_select(0, perm).long()
        rank_in_group = torch.arange(perm.numel(), device=recv_x.device) - starts_sorted[e_sorted]
        dst = pstarts[e_sorted] + rank_in_group
        xs = recv_x.new_zeros(sum(padded), self.H)
        xs.index_copy_(0, dst, recv_x.index_select(0, perm))
        offs = torch.tensor(padded, dtype=torch.int64).cumsum(0).to(torch.int32).to(recv_x.device)
        out = self.mlp.forward(xs, offs, padded)
        return out.index_select(0, dst)


# --------------------------------------------------------------------------
# Inputs, correctness check, timing
# --------------------------------------------------------------------------


def make_inputs(T, H, E, K, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, generator=g, device=device, dtype=torch.bfloat16)
    # Uniform random top-k: K distinct experts per token.
    scores = torch.rand(T, E, generator=g, device=device)
    topk_ids = torch.topk(scores, K, dim=1).indices
    topk_w = torch.softmax(torch.randn(T, K, generator=g, device=device), dim=1)  # fp32
    return x, topk_ids, topk_w


def all_gather_cat(t):
    """all_gather equal-shaped tensors and concatenate along dim 0."""
    W = dist.get_world_size()
    if W == 1:
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(W)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def check_forward(layer, x, topk_ids, topk_w, n_check):
    """Compare the layer's y against an fp32 per-token reference.

    A handful of tokens are picked on every rank and all-gathered (inputs,
    routing and the layer's output).  Each rank computes the fp32
    contribution of the experts it owns to every gathered token; a SUM
    all-reduce completes the reference, so no weights ever move and the check
    works for any preset and any W.  Returns the max relative L2 error.
    """
    T = x.shape[0]
    y = layer.forward(x, topk_ids, topk_w)
    n = min(n_check, T)
    idx = torch.linspace(0, T - 1, n).round().long().to(x.device)
    xs = all_gather_cat(x.index_select(0, idx))
    ids = all_gather_cat(topk_ids.index_select(0, idx))
    ws = all_gather_cat(topk_w.index_select(0, idx))
    ys = all_gather_cat(y.index_select(0, idx)).float()

    I, E_local = layer.I, layer.E_local
    lo = layer.rank * E_local
    ref = torch.zeros(xs.shape[0], layer.H, dtype=torch.float32, device=x.device)
    tok = torch.arange(xs.shape[0], device=x.device).unsqueeze(1).expand_as(ids).reshape(-1)
    e_flat = ids.reshape(-1)
    w_flat = ws.reshape(-1)
    mine = (e_flat >= lo) & (e_flat < lo + E_local)
    for e in torch.unique(e_flat[mine]).tolist():
        sel = (e_flat == e).nonzero().squeeze(1)
        t_sel = tok[sel]
        le = e - lo
        h = xs[t_sel].float() @ layer.mlp.w1[le].float().t()
        a = F.silu(h[:, :I]) * h[:, I:]
        o = a @ layer.mlp.w2[le].float().t()
        ref.index_add_(0, t_sel, o * w_flat[sel].unsqueeze(1))
    if layer.W > 1:
        dist.all_reduce(ref, op=dist.ReduceOp.SUM)

    if not torch.isfinite(ys).all():
        return float("inf")
    err = (ys - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    return err.max().item()


class Timer:
    """CUDA events on GPU, wall clock (after the forward returns) on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pairs = []
        self.cpu_times = []

    def start(self):
        if self.cuda:
            s = torch.cuda.Event(enable_timing=True)
            s.record()
            return s
        return time.perf_counter()

    def stop(self, s):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.pairs.append((s, e))
        else:
            self.cpu_times.append((time.perf_counter() - s) * 1e6)

    def times_us(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) * 1e3 for s, e in self.pairs]
        return list(self.cpu_times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def select_fp8_gemm(args, device, W):
    """Pick the fp8 GEMM path, the same on every rank.

    Returns (use_grouped, group_align, gemm_name): torch._scaled_grouped_mm when
    it works (with unaligned expert groups, else with groups padded to 16
    rows), otherwise a per-expert torch._scaled_mm loop.  Fails if neither works.
    """
    fast = args.fp8_fast_accum
    align = args.group_align
    use_grouped, why = False, "--gemm loop"
    if args.gemm != "loop":
        if align == 1:
            use_grouped, why = probe_scaled_grouped_mm(device, FP8_PROBE_UNALIGNED, fast)
            if not use_grouped:
                ok16, why16 = probe_scaled_grouped_mm(device, FP8_PROBE_ALIGNED, fast)
                if ok16:
                    log0(f"NOTE: expert groups padded to 16 rows: unaligned groups failed ({why})")
                    use_grouped, align = True, 16
                else:
                    why = f"{why}; {why16}"
        else:
            use_grouped, why = probe_scaled_grouped_mm(device, FP8_PROBE_ALIGNED, fast)
    # All ranks must take the same path: MIN of the grouped flag, MAX of the alignment.
    flag = torch.tensor([1 if use_grouped else 0, -align], device=device)
    if W > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    use_grouped, align = bool(flag[0].item()), -int(flag[1].item())
    if not use_grouped and args.gemm == "grouped":
        fail(f"--gemm grouped requested but {why or 'another rank failed the probe'}")
    if use_grouped:
        return True, align, "scaled_grouped_mm"
    log0(f"NOTE: FALLBACK in use -- per-expert torch._scaled_mm loop instead of "
         f"torch._scaled_grouped_mm ({why or 'another rank failed the probe'})")
    ok, why_loop = probe_scaled_mm(device, fast)
    flag = torch.tensor([1 if ok else 0], device=device)
    if W > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        fail(f"no working fp8 GEMM: {why}; {why_loop or 'another rank failed the probe'}")
    return False, align, "scaled_mm_loop"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dsv4-flash", choices=sorted(PRESETS))
    p.add_argument("--tokens", default="1,64,512,1024,2048,4096,8192",
                   help="comma-separated tokens per rank")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel size; must equal the world size (default: world size)")
    p.add_argument("--json", default=None, help="append one JSON object per T to this file (rank 0)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up forwards per T (>= 5)")
    p.add_argument("--warmup-ms", type=float, default=300.0,
                   help="then more warm-up forwards, for at least this long (default 300, as megamoe bench: "
                        "the card settles at the clock it holds under sustained load)")
    p.add_argument("--iters", type=int, default=20, help="timed forwards per T (>= 20)")
    p.add_argument("--input-sets", type=int, default=2,
                   help="distinct (x, routing) sets rotated between forwards (>= 2)")
    p.add_argument("--check-tokens", type=int, default=8,
                   help="tokens per rank checked against the fp32 reference (0 disables)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"],
                   help="fp8: e4m3 experts with rowwise scales (impl naive_torch_fp8), CUDA SM90/SM100 only")
    p.add_argument("--experts", type=int, default=None,
                   help="override the preset's expert count E (e.g. the experts one rank of a larger "
                        "EP group holds, to match `megamoe bench --experts`)")
    p.add_argument("--gemm", default="auto", choices=["auto", "grouped", "loop"],
                   help="auto: torch._grouped_mm (fp8: torch._scaled_grouped_mm) if it works, "
                        "else a per-expert mm (fp8: torch._scaled_mm) loop")
    p.add_argument("--group-align", type=int, default=1,
                   help="pad each expert group to a multiple of this many rows (1: no padding, "
                        "which torch._grouped_mm 2d x 3d bf16 does not need; for fp8, 1 means "
                        "'none if the start-up probe accepts unaligned groups, else 16')")
    p.add_argument("--fp8-fast-accum", action="store_true",
                   help="fp8: use_fast_accum=True (Hopper fp8 accumulation without periodic fp32 "
                        "promotion; faster, less accurate).  Default False, PyTorch's default")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: gloo backend, for debugging the logic only")
    return p.parse_args()


def main():
    args = parse_args()
    if args.warmup < 5 or args.iters < 20 or args.input_sets < 2:
        # Allowed for quick debugging, but say so.
        print("note: below the recommended --warmup 5 / --iters 20 / --input-sets 2", file=sys.stderr)
    H, I, E, K = PRESETS[args.preset]
    if args.experts is not None:
        if args.experts < K:
            sys.exit(f"--experts {args.experts} is below top-k {K}")
        E = args.experts
    if args.group_align < 1:
        sys.exit("--group-align must be >= 1")
    if args.dtype == "fp8" and args.device != "cuda":
        sys.exit("--dtype fp8 needs a CUDA GPU (SM90/SM100: torch._scaled_grouped_mm / torch._scaled_mm); "
                 "--device cpu runs --dtype bf16 only")
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("CUDA is not available (use --device cpu to debug on CPU)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "RANK" not in os.environ:  # plain `python bench/naive_ep.py`: one rank
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if backend == "nccl":
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    W, rank = dist.get_world_size(), dist.get_rank()
    if args.ep is not None and args.ep != W:
        log0(f"--ep {args.ep} must equal the world size {W}")
        dist.destroy_process_group()
        sys.exit(2)
    if E % W:
        log0(f"E={E} is not divisible by the world size {W}")
        dist.destroy_process_group()
        sys.exit(2)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32

    if args.dtype == "fp8":
        use_grouped, group_align, gemm_name = select_fp8_gemm(args, device, W)
        impl, tol = "naive_torch_fp8", FP8_REL_TOL
    else:
        if args.gemm == "loop":
            use_grouped, why = False, "--gemm loop"
        else:
            use_grouped, why = probe_grouped_mm(device)
        # All ranks must take the same path.
        flag = torch.tensor([1 if use_grouped else 0], device=device)
        if W > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        use_grouped = bool(flag.item())
        if not use_grouped and args.gemm == "grouped":
            fail(f"--gemm grouped requested but {why or 'another rank failed the probe'}")
        if not use_grouped:
            log0(f"NOTE: FALLBACK in use -- per-expert torch.mm loop instead of torch._grouped_mm ({why or 'another rank failed the probe'})")
        gemm_name = "grouped_mm" if use_grouped else "mm_loop"
        group_align = args.group_align
        impl, tol = "naive_torch", REL_TOL

    layer = NaiveEPLayer(H, I, E, K, W, rank, device, args.seed, use_grouped, group_align,
                         dtype=args.dtype, fp8_fast_accum=args.fp8_fast_accum)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fp8_s = f", fast_accum {args.fp8_fast_accum}, tol {tol}" if args.dtype == "fp8" else ""
    log0(f"{impl} EP layer: preset {args.preset} (H {H}, I {I}, E {E}, K {K}), ep {W}, "
         f"{layer.E_local} experts/rank, dtype {args.dtype}, gemm {gemm_name}, group_align {group_align}"
         f"{fp8_s}, torch {torch.__version__}, {dev_name}")
    log0(f"{'T':>6} {'median_us':>12} {'min_us':>12} {'check_err':>10}")

    for T in tokens:
        sets = [make_inputs(T, H, E, K, device, (args.seed * 7919 + T) * 64 + rank * 8 + s)
                for s in range(max(1, args.input_sets))]
        dist.barrier()

        err = None
        if args.check_tokens > 0:
            err = check_forward(layer, *sets[0], args.check_tokens)
            if not err <= tol:
                fail(f"T={T}: forward disagrees with the fp32 reference: "
                     f"max relative error {err:.3g} > {tol}")

        began = time.perf_counter()
        for i in range(args.warmup):
            layer.forward(*sets[i % len(sets)])
        sync(device)
        # More forwards to fill --warmup-ms; the same number on every rank (each forward exchanges
        # tokens with every peer).
        elapsed_ms = (time.perf_counter() - began) * 1e3
        per_forward_ms = max(elapsed_ms / max(args.warmup, 1), 1e-3)
        more = torch.tensor([min(math.ceil(max(args.warmup_ms - elapsed_ms, 0.0) / per_forward_ms), 10 ** 6)],
                            dtype=torch.float64, device=device)
        if W > 1:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        for i in range(int(more.item())):
            layer.forward(*sets[i % len(sets)])
        sync(device)
        dist.barrier()

        timer = Timer(device)
        for i in range(args.iters):
            s = timer.start()
            layer.forward(*sets[i % len(sets)])
            timer.stop(s)
        times = timer.times_us()
        stats = torch.tensor([statistics.median(times), min(times)], dtype=torch.float64, device=device)
        if W > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank's
        med_us, min_us = stats.tolist()

        err_s = "skipped" if err is None else f"{err:.2e}"
        log0(f"{T:>6} {med_us:>12.1f} {min_us:>12.1f} {err_s:>10}")
        if args.json and rank == 0:
            rec = {"impl": impl, "dtype": args.dtype, "preset": args.preset, "experts": E,
                   "ep": W, "tokens": T,
                   "latency_us": round(med_us, 2), "min_us": round(min_us, 2),
                   "gemm": gemm_name, "iters": args.iters, "device": dev_name,
                   "check_rel_err": err}
            if args.dtype == "fp8":
                rec.update({"group_align": group_align, "fast_accum": args.fp8_fast_accum})
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
