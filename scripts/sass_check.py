#!/usr/bin/env python3
"""What ptxas made of the wgmma loops, per kernel of the library (gpu-check.sh's `sass` step).

Reads `cuobjdump -sass` of the library (or a saved listing) and prints, for every kernel with wgmma:
its instructions, wgmma, local-memory accesses (STL/LDL: spills) in all and inside its wgmma loops,
and R2UR moves inside those loops. A wgmma loop is the innermost loop around a wgmma: the span from a
backward branch's target to the branch. Spills there cost every k block; R2UR there means the wgmma
descriptors left the uniform registers (docs/PERFORMANCE.md, twenty-eighth session). Both showed up
only in ptxas's output after changes that looked harmless in the source.

Fails (exit 1) when a grouped-GEMM kernel (the staged forward's FC1 and FC2) touches local memory
inside a wgmma loop: none does today, and a change that makes one must say why. The fused kernels'
numbers are printed, not checked (their loops hold other phases too).

  scripts/sass_check.py [--listing FILE | LIBRARY]   (default build/lib/libmegamoe.so)
"""
import argparse
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
BRANCH_TARGET = re.compile(r"BRA\s+\(?0x([0-9a-f]+)")


def kernels(listing):
    """{kernel name: [(address, opcode, operands)]} from a cuobjdump -sass listing."""
    out, current = {}, None
    for line in listing.splitlines():
        if "Function :" in line:
            current = line.split("Function :", 1)[1].strip()
            out[current] = []
        elif current is not None:
            m = INSTRUCTION.search(line)
            if m:
                out[current].append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def wgmma_loops(code):
    """The address spans of the innermost loops that hold a wgmma."""
    loops = []
    for address, opcode, operands in code:
        if opcode.startswith("BRA"):
            m = BRANCH_TARGET.search(opcode + operands)
            if m and int(m.group(1), 16) <= address:
                loops.append((int(m.group(1), 16), address))
    spans = set()
    for address, opcode, _ in code:
        if "GMMA" in opcode:
            around = [l for l in loops if l[0] <= address <= l[1]]
            if around:
                spans.add(min(around, key=lambda l: l[1] - l[0]))
    return sorted(spans)


def summary(code):
    spans = wgmma_loops(code)
    inside = lambda a: any(lo <= a <= hi for lo, hi in spans)
    local = lambda op: op.startswith("STL") or op.startswith("LDL")
    return {
        "instructions": len(code),
        "wgmma": sum("GMMA" in op for _, op, _ in code),
        "local": sum(local(op) for _, op, _ in code),
        "local_in_loops": sum(local(op) and inside(a) for a, op, _ in code),
        "r2ur_in_loops": sum(op.startswith("R2UR") and inside(a) for a, op, _ in code),
    }


def short_name(name):
    """'fc1 fp8 BN 256 cluster 1' for a grouped GEMM, 'fused fp8 BN 256 cluster 1 windowed' for the
    fused kernel (the template arguments as the mangled name spells them)."""
    operands = "fp8" if "Fp8Operands" in name else "bf16"
    if "grouped_gemm_kernel" in name:
        m = re.search(r"OperandsELi(\d+)ELi(\d+)E", name)
        gemm = "fc1" if "Swiglu" in name else "fc2" if "Scatter" in name else "gemm"
        return f"{gemm} {operands} BN {m.group(1)} cluster {m.group(2)}" if m else name[:64]
    if "fused_forward_kernel" in name:
        m = re.search(r"OperandsELi(\d+)ELi(\d+)ELb([01])E", name)
        if m:
            return f"fused {operands} BN {m.group(2)} cluster {m.group(1)}" + (" windowed" if m.group(3) == "1" else "")
    return name[:64]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", nargs="?", default="build/lib/libmegamoe.so")
    parser.add_argument("--listing", help="a saved `cuobjdump -sass` listing instead of the library")
    args = parser.parse_args()
    if args.listing:
        with open(args.listing) as f:
            listing = f.read()
    else:
        listing = subprocess.run(["cuobjdump", "-sass", args.library], check=True, capture_output=True,
                                 text=True).stdout
    failures = 0
    print(f"{'kernel':40s} {'instr':>7s} {'wgmma':>5s} {'STL+LDL':>7s} {'in loops':>8s} {'R2UR in loops':>13s}")
    for name, code in kernels(listing).items():
        s = summary(code)
        if s["wgmma"] == 0:
            continue
        checked = "grouped_gemm_kernel" in name
        bad = checked and s["local_in_loops"] > 0
        failures += bad
        print(f"{short_name(name)[:40]:40s} {s['instructions']:7d} {s['wgmma']:5d} {s['local']:7d} "
              f"{s['local_in_loops']:8d} {s['r2ur_in_loops']:13d}{'  <- local memory in a wgmma loop' if bad else ''}")
    if failures:
        print(f"{failures} grouped-GEMM kernel(s) touch local memory inside a wgmma loop", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
