#!/usr/bin/env python3
"""Measure this GPU's ceilings with PyTorch: the numbers megamoe is held to.

  - HBM: device-to-device copy of a 4 GiB tensor, counting bytes read + written;
  - dense bf16 GEMM 8192^3 (torch.mm) TFLOP/s;
  - fp8 e4m3 GEMM 8192^3 (torch._scaled_mm, per-tensor scales, bf16 out)
    TFLOP/s, with use_fast_accum=True (the ceiling, "fp8_tflops") and False
    (fp32 promotion, "fp8_tflops_precise");
  - with >= 2 GPUs: copy-engine peer copy GPU0 -> GPU1 (tensor.copy_), GB/s.
Random inputs (never zeros), warm-up first (a few runs, then repeats for at
least --warmup-ms: under sustained load an H200 reaches its 700 W power cap and
lowers its SM clock within ~0.1 s, and `megamoe bench` times the layer after
the same warm-up), then the median of timed repeats (CUDA events); after each,
the SM clock nvidia-smi reads.  Prints readable lines and a last line
  CEILINGS {"gpu": ..., "hbm_gbps": ..., "bf16_tflops": ..., "fp8_tflops": ...,
            "fp8_tflops_precise": ..., "nvlink_gbps": ... or null}

Usage: python3 bench/ceilings.py [--warmup-ms MS]   (default 300; about 10-20 s on an H200)
"""

import os

# NVLink multicast must stay off on the shared GPU hosts.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


WARMUP_MS = 300.0  # --warmup-ms


def sm_clock_mhz(device):
    """The SM clock nvidia-smi reads now, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(device.index or 0), "--query-gpu=clocks.sm",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip())
    except Exception:  # noqa: BLE001
        return None


def time_ms(fn, warmup, reps, device):
    """Median milliseconds of fn() over reps, each bracketed by CUDA events on device's stream,
    after `warmup` runs and then repeats for at least WARMUP_MS."""
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        began = time.monotonic()
        while (time.monotonic() - began) * 1e3 < WARMUP_MS:
            for _ in range(max(warmup, 1)):
                fn()
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        clock = sm_clock_mhz(device)
    print(f"  (SM clock after the timed repeats: {clock if clock is not None else 'n/a'} MHz)")
    return statistics.median(times)


def hbm_gbps(dev):
    n = 1 << 30  # 2^30 fp32 = 4 GiB
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_(1.0, 2.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20, device=dev)
    assert torch.equal(dst[:1024], src[:1024])
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def bf16_tflops(dev, n=8192):
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    out = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.mm(a, b, out=out), warmup=10, reps=30, device=dev)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def fp8_tflops(dev, fast_accum, n=8192):
    """torch._scaled_mm(a [M,K] e4m3 row-major, b [K,N] e4m3 column-major,
    scale_a, scale_b: 0-dim fp32 (per-tensor), out_dtype=bf16).  None if refused."""
    if not hasattr(torch, "_scaled_mm"):
        print("  torch._scaled_mm does not exist in this torch", file=sys.stderr)
        return None
    g = torch.Generator(device=dev).manual_seed(1)
    a = torch.randn(n, n, device=dev, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=dev, generator=g).to(torch.float8_e4m3fn).t()  # column-major
    sa = torch.tensor(1.0, device=dev)
    sb = torch.tensor(1.0, device=dev)

    def run():
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                use_fast_accum=fast_accum)
    try:
        ref = run()
        if not torch.isfinite(ref.float()).all():
            print("  fp8 GEMM produced non-finite output", file=sys.stderr)
            return None
        ms = time_ms(run, warmup=10, reps=30, device=dev)
    except Exception as exc:  # noqa: BLE001
        print(f"  torch._scaled_mm failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def peer_gbps():
    """One-way GPU0 -> GPU1 copy through tensor.copy_ (copy engine, peer access).
    ATen issues a cross-device copy on the source device's current stream, so
    events on GPU0's stream bracket it."""
    n = 1 << 28  # 2^28 fp32 = 1 GiB
    src = torch.empty(n, dtype=torch.float32, device="cuda:0").uniform_(1.0, 2.0)
    dst = torch.empty(n, dtype=torch.float32, device="cuda:1")
    ms = time_ms(lambda: dst.copy_(src), warmup=2, reps=10, device=torch.device("cuda", 0))
    torch.cuda.synchronize(1)
    if not torch.equal(dst[:1024].cpu(), src[:1024].cpu()):
        print("  peer copy: destination does not match", file=sys.stderr)
        return None
    return 4 * n / (ms * 1e-3) / 1e9


def main():
    global WARMUP_MS
    parser = argparse.ArgumentParser(description="Measure this GPU's ceilings (see the module docstring).")
    parser.add_argument("--warmup-ms", type=float, default=WARMUP_MS,
                        help="repeat each measurement for at least this long before timing it (default 300)")
    WARMUP_MS = max(parser.parse_args().warmup_ms, 0.0)
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev)
    cap = torch.cuda.get_device_capability(dev)
    print(f"gpu: {name} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)")
    res = {"gpu": name, "warmup_ms": WARMUP_MS}
    res["hbm_gbps"] = round(hbm_gbps(dev), 1)
    print(f"HBM device-to-device copy (4 GiB, read + write): {res['hbm_gbps']:.1f} GB/s")
    res["bf16_tflops"] = round(bf16_tflops(dev), 1)
    print(f"bf16 GEMM 8192^3 (torch.mm): {res['bf16_tflops']:.1f} TFLOP/s")
    for key, fast in (("fp8_tflops", True), ("fp8_tflops_precise", False)):
        v = fp8_tflops(dev, fast)
        res[key] = None if v is None else round(v, 1)
        print(f"fp8 e4m3 GEMM 8192^3 (torch._scaled_mm, per-tensor, bf16 out, use_fast_accum={fast}): "
              + ("n/a" if v is None else f"{v:.1f} TFLOP/s"))
    res["nvlink_gbps"] = None
    if torch.cuda.device_count() >= 2:
        v = peer_gbps()
        res["nvlink_gbps"] = None if v is None else round(v, 1)
        print("peer copy GPU0 -> GPU1 (copy engine, tensor.copy_, 1 GiB): "
              + ("n/a" if v is None else f"{v:.1f} GB/s"))
    else:
        print("peer copy GPU0 -> GPU1: n/a (one GPU)")
    print("CEILINGS " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
