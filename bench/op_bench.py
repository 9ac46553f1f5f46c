#!/usr/bin/env python3
"""The PyTorch op's latency, measured the way `megamoe bench` measures the C++ layer.

torch.ops.megamoe.forward goes through ctypes and the C ABI to the same Layer::forward that
`megamoe bench` times, so once the op is captured in a CUDA graph its latency should equal the C++
layer's within noise; this benchmark shows whether it does. Run in the same job as `megamoe bench`
(scripts/gpu-check.sh: the `bench` and `op-bench` steps write to the same bench.jsonl) and
bench/compare.py puts the two side by side ("op graph us", "op / C++").

For each T (tokens per rank), as src/cli/bench.cpp does:
  - input sets (x bf16 uniform in [-1, 1); uniform routing: top_k distinct experts per token, fp32
    weights 0.5 + u normalised per token), as many as megamoe bench rotates so that together they
    exceed L2;
  - variant "graph": one CUDA graph per set, each capturing one torch.ops.megamoe.forward on the
    current stream; warm-up replays for at least --warmup-ms (3 x sets, then as many as fill it: the
    card settles at the clock it holds under sustained load); --iters timed replays in rotation, each bracketed by
    CUDA events; per rank the median; reported: the slowest rank's median (and its minimum);
  - variant "eager": the same with the op called directly, no graph. The events time the stream, so
    the op's Python, dispatch and launch overhead shows where the host cannot stay ahead of the GPU
    (small T); "host_us" is the host's time per call, measured around each call.
The same random distributions as megamoe bench, not the same numbers (different generators). At
world size 1 the op's layer uses the loopback transport of one rank and megamoe bench an NCCL
communicator of one rank: the kernels, device barrier included, are the same code.

Each row appends one JSON line per variant (rank 0) with impl "megamoe-torch-op", variant "graph" or
"eager", and megamoe bench's other fields (dtype, preset, experts, ep, tokens, latency_us, min_us,
tflops, gpu, routing, sms; no roofline floor: megamoe bench's lines carry it).

Launch (one GPU per rank; the layer joins the default process group):
  torchrun --standalone --nproc_per_node W bench/op_bench.py --preset dsv4-flash --dtype fp8 \\
      --tokens 1,64,512,1024,2048,4096,8192 --json out/bench.jsonl
  python3 bench/op_bench.py --preset dsv4-flash --experts 64 ...     (one GPU, world size 1)
From a checkout: PYTHONPATH=python, and MEGAMOE_LIBRARY=build/lib/libmegamoe.so if needed.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# NVLink multicast stays off on the shared GPU hosts (scripts/env.sh says why); set before NCCL starts.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

try:
    import torch
    import torch.distributed as dist
except ImportError as e:  # reported by main() once the flags are checked
    torch = dist = None
    TORCH_IMPORT_ERROR = e

IMPL = "megamoe-torch-op"
MAX_TOKENS = 1 << 20  # megamoe bench's --tokens bound (kMaxBenchTokens)
NO_GPU_EXIT = 2  # as `megamoe bench` without a GPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Details: the docstring of bench/op_bench.py.")
    p.add_argument("--preset", default="dsv4-flash",
                   help="a preset of the library (megamoe.preset: dsv3, dsv4-flash, dsv4-pro, tiny)")
    p.add_argument("--experts", type=int, default=None,
                   help="override the preset's expert count (e.g. the experts one rank of EP 4 holds, as "
                        "`megamoe bench --experts`)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"], help="weight format (default bf16)")
    p.add_argument("--tokens", default="1,64,512,1024,2048,4096,8192", help="tokens per rank, comma-separated")
    p.add_argument("--iters", type=int, default=30, help="timed forwards per T and variant (default 30)")
    p.add_argument("--warmup-ms", type=float, default=300.0,
                   help="warm-up forwards per T and variant for at least this long (default 300, as megamoe bench)")
    p.add_argument("--json", default=None, help="append one JSON line per T and variant to this file (rank 0)")
    args = p.parse_args(argv)
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error("--tokens %r: expected integers separated by commas, e.g. 1,64,512" % args.tokens)
    if any(not 0 <= t <= MAX_TOKENS for t in args.tokens):
        p.error("--tokens %s: each must be in [0, %d]" % (",".join(map(str, args.tokens)), MAX_TOKENS))
    if args.iters < 1:
        p.error("--iters %d: must be >= 1" % args.iters)
    if not 0 <= args.warmup_ms <= 60000:
        p.error("--warmup-ms %g: must be in [0, 60000]" % args.warmup_ms)
    if args.experts is not None and args.experts < 1:
        p.error("--experts %d: must be >= 1" % args.experts)
    if args.json is not None:
        # Checked now, not after the first row has been measured.
        target = Path(args.json)
        if target.is_dir():
            p.error("--json %s: is a directory, not a file" % args.json)
        folder = target.parent if str(target.parent) else Path(".")
        if target.exists() and not os.access(target, os.W_OK):
            p.error("--json %s: file is not writable" % args.json)
        if not target.exists() and not (folder.is_dir() and os.access(folder, os.W_OK)):
            p.error("--json %s: directory %s does not exist or is not writable" % (args.json, folder))
    return args


def import_megamoe():
    """The package megamoe (torch-free; megamoe.torch is imported by OpBench, once PyTorch and a GPU are
    known to be there)."""
    try:
        import megamoe
    except ImportError:  # running from a checkout without PYTHONPATH=python
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
        import megamoe
    return megamoe


def input_set_count(tokens, hidden, top_k):
    """How many input sets megamoe bench rotates (src/cli/bench.cpp): x and y in bf16 plus int32 ids and
    fp32 weights of all sets must pass 100 MB (twice the 50 MB L2 of an H100 or H200), 2 to 8 sets."""
    set_bytes = tokens * (hidden * 2 * 2 + top_k * 8)
    return int(min(8, max(2, math.ceil(2 * 50e6 / max(set_bytes, 1.0)))))


def bench_median(values):
    """The element at len/2 of the sorted values: megamoe bench's median (the upper middle for even
    counts, where statistics.median would average the two)."""
    return sorted(values)[len(values) // 2]


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    max_tokens = max(1, max(args.tokens))

    # The shape comes from the library's presets (the swiglu limit included: it is part of the layer
    # megamoe bench times) and is checked by the library before any GPU is touched.
    megamoe = import_megamoe()
    try:
        dims = megamoe.preset(args.preset)
        hidden, intermediate, top_k = dims["hidden"], dims["intermediate"], dims["top_k"]
        swiglu_limit = dims["swiglu_limit"]
        experts = args.experts or dims["num_experts"]
        megamoe.validate_shape(hidden=hidden, intermediate=intermediate, num_experts=experts, top_k=top_k,
                               max_tokens_per_rank=max_tokens, ep_size=world, weight_dtype=args.dtype,
                               swiglu_limit=swiglu_limit)
    except megamoe.LibraryNotFoundError as e:
        print("bench/op_bench.py: %s" % e, file=sys.stderr)
        return 1
    except ValueError as e:
        print("bench/op_bench.py: --preset %s%s on %d rank(s): %s"
              % (args.preset, " --experts %d" % args.experts if args.experts else "", world, e), file=sys.stderr)
        return 2

    if torch is None:
        print("bench/op_bench.py: needs PyTorch (%s)" % TORCH_IMPORT_ERROR, file=sys.stderr)
        return NO_GPU_EXIT
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        print("bench/op_bench.py: no CUDA GPU visible (torch.cuda.is_available() is False); the op benchmark "
              "needs one GPU per rank", file=sys.stderr)
        return NO_GPU_EXIT
    if local_rank >= torch.cuda.device_count():
        print("bench/op_bench.py: LOCAL_RANK %d but only %d CUDA GPU(s) visible: one GPU per rank"
              % (local_rank, torch.cuda.device_count()), file=sys.stderr)
        return NO_GPU_EXIT
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    return OpBench(args, (hidden, intermediate, experts, top_k, swiglu_limit), world, device).run()


class OpBench:
    """This rank's layer (MoE on the default process group, random weights) and its measurements."""

    def __init__(self, args, shape, world, device):
        from megamoe.torch import MoE  # after import_megamoe() has found the package

        self.args, self.device = args, device
        self.hidden, self.intermediate, self.experts, self.top_k, swiglu_limit = shape
        self.world = world
        if world > 1:
            dist.init_process_group("nccl", device_id=device)
        self.rank = dist.get_rank() if world > 1 else 0
        # The benchmark's own non-blocking stream, like megamoe bench's; everything below runs on it.
        self.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self.stream):
            self.moe = MoE(None, num_experts=self.experts, hidden=self.hidden, intermediate=self.intermediate,
                           top_k=self.top_k, max_tokens_per_rank=max(1, max(args.tokens)),
                           weight_dtype=args.dtype, swiglu_limit=swiglu_limit)
            self.load_random_weights(seed=1234 + 7777 * self.rank)
        self.op = torch.ops.megamoe.forward.default
        self.gpu = torch.cuda.get_device_name(device)

    def log(self, text):
        if self.rank == 0:
            print(text, flush=True)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def slowest(self, *values):
        """Each value's maximum over the ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(t.tolist())

    def fail(self, message):
        """A layer that recorded an error may have peers still waiting on it: report and leave at once,
        without unwinding (destructors and collectives could wait forever), as megamoe bench does."""
        print("[rank %d] bench/op_bench.py: %s" % (self.rank, message), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def synchronize(self):
        self.stream.synchronize()
        try:
            self.moe.check_errors()
        except RuntimeError as e:
            self.fail(str(e))

    def load_random_weights(self, seed):
        """This rank's experts, uniform in +-1/sqrt(fan_in), drawn on the GPU a few experts at a time (no
        second full copy); fp8 layers get them in the checkpoint format (quantize_weights_fp8)."""
        from megamoe.torch import quantize_weights_fp8

        local, H, I = self.moe.experts_per_rank, self.hidden, self.intermediate
        chunk = min(local, 8)
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        w13 = torch.empty((chunk, 2 * I, H), dtype=torch.bfloat16, device=self.device)
        w2 = torch.empty((chunk, H, I), dtype=torch.bfloat16, device=self.device)
        for first in range(0, local, chunk):
            n = min(chunk, local - first)
            w13[:n].uniform_(-1 / math.sqrt(H), 1 / math.sqrt(H), generator=g)
            w2[:n].uniform_(-1 / math.sqrt(I), 1 / math.sqrt(I), generator=g)
            if self.args.dtype == "fp8":
                q13, s13 = quantize_weights_fp8(w13[:n])
                q2, s2 = quantize_weights_fp8(w2[:n])
                self.moe.load_expert_weights(first, q13, q2, s13, s2)
            else:
                self.moe.load_expert_weights(first, w13[:n], w2[:n])

    def make_input_set(self, tokens, seed):
        """(x, topk_ids int32, topk_weights fp32) of one input set, made on the GPU."""
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        x = torch.empty((tokens, self.hidden), dtype=torch.bfloat16, device=self.device).uniform_(-1, 1, generator=g)
        # The top_k largest of i.i.d. uniform scores: a uniformly random set of distinct experts.
        scores = torch.rand((tokens, self.experts), generator=g, device=self.device)
        ids = scores.topk(self.top_k, dim=1).indices.to(torch.int32).contiguous()
        raw = 0.5 + torch.rand((tokens, self.top_k), generator=g, device=self.device)
        weights = (raw / raw.sum(dim=1, keepdim=True)).contiguous()
        return x, ids, weights

    def call(self, input_set):
        x, ids, weights = input_set
        return self.op(self.moe.handle, x, None, ids, weights, 1.0, None)

    def capture(self, sets):
        """One CUDA graph per input set, each holding one op call, and the graphs' outputs. Captured
        thread-local, as megamoe bench captures: other threads (NCCL's watchdog) may use CUDA meanwhile."""
        graphs, outputs = [], []
        for input_set in sets:
            graphs.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graphs[-1], stream=self.stream, capture_error_mode="thread_local"):
                outputs.append(self.call(input_set))
        return graphs, outputs

    def time_stream(self, launch, count, iters):
        """launch(i) for i in range(iters), each bracketed by CUDA events on the stream, all enqueued before
        one synchronisation (as megamoe bench does). Returns (device us, host us) per launch."""
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        host_us = []
        for i, (start, end) in enumerate(events):
            start.record(self.stream)
            t0 = time.perf_counter()
            launch(i % count)
            host_us.append((time.perf_counter() - t0) * 1e6)
            end.record(self.stream)
        self.synchronize()
        return [1e3 * start.elapsed_time(end) for start, end in events], host_us

    def warm_up(self, launch, count):
        """launch(i % count) 3 x count times, then as many more as fill --warmup-ms, as megamoe bench
        warms up (the same number on every rank: a forward waits on its peers)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        for w in range(3 * count):
            launch(w % count)
        end.record(self.stream)
        self.synchronize()
        first_ms = start.elapsed_time(end)
        per_launch_ms = max(first_ms / (3 * count), 1e-3)
        more = min(math.ceil(max(self.args.warmup_ms - first_ms, 0.0) / per_launch_ms), 10 ** 6)
        more = int(self.slowest(float(more))[0])
        for w in range(more):
            launch(w % count)
        self.synchronize()

    def check_finite(self, y, tokens, variant):
        if tokens > 0 and not bool(torch.isfinite(y.view(-1)[: 1 << 20]).all()):
            self.fail("non-finite output at T=%d (%s)" % (tokens, variant))

    def measure(self, tokens):
        """{variant: (slowest median us, slowest min us, slowest median host us per call)} for one T."""
        count = input_set_count(tokens, self.hidden, self.top_k)
        sets = [self.make_input_set(tokens, 99991 * (i + 1) + 131 * self.rank + tokens) for i in range(count)]
        self.synchronize()
        self.barrier()  # no rank's first forward waits on a peer still making its inputs
        # A first call outside any capture: whatever the op or PyTorch initialises on first use (and any
        # argument error) happens here, not inside a graph capture.
        self.call(sets[0])
        self.synchronize()

        graphs, outputs = self.capture(sets)
        self.barrier()  # every rank has captured before any replays (a forward waits on its peers)
        self.warm_up(lambda i: graphs[i].replay(), count)
        self.barrier()
        device_us, host_us = self.time_stream(lambda i: graphs[i].replay(), count, self.args.iters)
        self.check_finite(outputs[0], tokens, "graph")
        results = {"graph": self.slowest(bench_median(device_us), min(device_us), bench_median(host_us))}
        graphs.clear()  # their memory pools go back before the eager calls
        outputs.clear()

        last = [None]

        def eager(i):
            last[0] = self.call(sets[i])

        self.warm_up(eager, count)
        self.barrier()
        device_us, host_us = self.time_stream(eager, count, self.args.iters)
        self.check_finite(last[0], tokens, "eager")
        results["eager"] = self.slowest(bench_median(device_us), min(device_us), bench_median(host_us))
        return results

    def run(self):
        args = self.args
        self.log("bench/op_bench.py (%s): %s H=%d I=%d E=%d K=%d EP=%d (%d experts/rank) max_tokens/rank=%d %s "
                 "swiglu_limit=%g, %d x %s, %d SMs, routing uniform, torch %s; %d timed forwards per T and variant "
                 "(median of the slowest rank)"
                 % (IMPL, args.preset, self.hidden, self.intermediate, self.experts, self.top_k, self.world,
                    self.moe.experts_per_rank, self.moe.max_tokens_per_rank, args.dtype, self.moe.swiglu_limit,
                    self.world, self.gpu, self.moe.num_sms, torch.__version__, args.iters))
        header = ("T/rank", "graph us", "graph min us", "eager us", "eager min us", "eager/graph", "host us/call g|e")
        self.log("%8s %10s %12s %10s %12s %11s %17s" % header)
        flops_per_token = 2.0 * self.top_k * 3 * self.hidden * self.intermediate  # as src/core/roofline.cpp
        with torch.cuda.stream(self.stream):
            for tokens in args.tokens:
                results = self.measure(tokens)
                (g_med, g_min, g_host), (e_med, e_min, e_host) = results["graph"], results["eager"]
                self.log("%8d %10.1f %12.1f %10.1f %12.1f %10.2fx %8.1f|%-8.1f"
                         % (tokens, g_med, g_min, e_med, e_min, e_med / g_med if g_med > 0 else float("nan"),
                            g_host, e_host))
                if args.json and self.rank == 0:
                    with open(args.json, "a") as f:
                        for variant, (median, minimum, host) in results.items():
                            f.write(json.dumps({
                                "impl": IMPL, "variant": variant, "dtype": args.dtype, "preset": args.preset,
                                "experts": self.experts, "ep": self.world, "tokens": tokens,
                                "latency_us": round(median, 2), "min_us": round(minimum, 2),
                                "tflops": round(flops_per_token * tokens / (median * 1e6), 2) if median > 0 else 0.0,
                                "gpu": self.gpu, "routing": "uniform", "sms": self.moe.num_sms,
                                "host_us": round(host, 2), "iters": args.iters,
                                "input_sets": input_set_count(tokens, self.hidden, self.top_k),
                                "torch": torch.__version__}) + "\n")
                torch.cuda.empty_cache()
        self.barrier()
        self.moe.close()
        if self.world > 1:
            dist.destroy_process_group()
        return 0


if __name__ == "__main__":
    sys.exit(main())
