#!/usr/bin/env python3
"""Where a kernel's warps wait, by line of this repository's sources.

Reads the CSV of `ncu --import REPORT --page source --csv --print-source cuda,sass` (a report taken
with `--import-source yes` on a -lineinfo build) and prints, per kernel, the share of all warp-state
samples at each source line of src/ and include/, with the line's three largest stall reasons.

Nsight lists an inlined instruction under the line of every frame it was inlined through, so one
instruction counts once per frame: shares of different lines may overlap (a call site holds the
samples of what it inlines), and the per-file totals are not meant to add up to 100%. The kernel's
total is counted once, from the instructions' addresses.

    python3 bench/ncu_source_summary.py source.csv [--top N]
"""
import argparse
import collections
import csv
import re
import sys

OUR_DIRS = ("/src/", "/include/megamoe/")


def short_kernel(name: str) -> str:
    name = re.sub(r"megamoe::(gemm|moe)::", "", name)
    name = re.sub(r"\(CUtensorMap_st.*", "", name)
    return name.replace("GroupedGemmConfig", "Config")[:150]


def summarise(rows, top):
    kernel = path = None
    header = []
    per_kernel = collections.OrderedDict()
    for row in rows:
        if not row:
            continue
        if row[0] == "Function Name":
            kernel = short_kernel(row[1])
            per_kernel.setdefault(kernel, {"lines": collections.Counter(), "text": {}, "stalls": {},
                                           "address": {}})
            continue
        if row[0] == "File Path":
            path = row[1]
            continue
        if row[0] == "Line No":
            header = row
            continue
        if kernel is None or not header or len(row) != len(header):
            continue
        k = per_kernel[kernel]
        try:
            samples = float(row[4])
        except ValueError:
            continue
        if row[0]:  # a source line: its samples are the sum over its instructions
            ours = next((path[path.index(d) + 1:] for d in OUR_DIRS if d in path), None)
            if ours is None:
                continue
            key = (ours, int(row[0]))
            k["lines"][key] += samples
            k["text"][key] = row[1].strip()[:70]
            stalls = k["stalls"].setdefault(key, collections.Counter())
            for i, name in enumerate(header):
                if name.startswith("stall_") and "Not Issued" not in name:
                    try:
                        stalls[name[6:]] += float(row[i])
                    except ValueError:
                        pass
        elif row[2].startswith("0x"):  # an instruction: counted once per address for the total
            k["address"][row[2]] = samples
    for kernel, k in per_kernel.items():
        total = sum(k["address"].values())
        if total <= 0:
            continue
        print(f"== {kernel}\n   {total:.0f} warp samples, {len(k['address'])} instructions")
        for key, samples in k["lines"].most_common(top):
            reasons = ", ".join(f"{r} {v / samples * 100:.0f}%" for r, v in k["stalls"][key].most_common(3) if v > 0)
            print(f"  {samples / total * 100:5.1f}%  {key[0]}:{key[1]}  {k['text'][key]}  [{reasons}]")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=30, help="lines per kernel (default 30)")
    args = parser.parse_args()
    with open(args.csv, errors="replace", newline="") as f:
        summarise(csv.reader(f), args.top)


if __name__ == "__main__":
    sys.exit(main())
