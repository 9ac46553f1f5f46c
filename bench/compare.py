#!/usr/bin/env python3
"""Compare megamoe against the naive PyTorch EP layer.

Reads one or more JSONL files (one JSON object per line) holding results of
both benchmarks:
  naive_torch: {"impl": "naive_torch", "preset", "ep", "tokens", "latency_us", "min_us", ...}
  megamoe:     {"impl": "megamoe", "preset", "ep", "tokens", "latency_us",
                "tflops", "floor_us", "vs_floor", ...}
and prints one table per (preset, ep):
  T | megamoe us | naive us | speedup (naive/megamoe) | floor us | megamoe/floor
Missing values show as "-".  When a (impl, preset, ep, tokens) appears more
than once, the line read last wins (files are read in the order given).

Usage: python3 bench/compare.py out.jsonl [more.jsonl ...]
Plain Python 3.8+, standard library only.
"""

import argparse
import json
import math
import sys

MEGAMOE = "megamoe"
NAIVE = "naive_torch"


def _number(v):
    """A finite positive float, or None."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or f <= 0:
        return None
    return f


def load(paths):
    """{(preset, ep): {tokens: {impl: record}}}"""
    table = {}
    for path in paths:
        try:
            fh = open(path, "r")
        except OSError as exc:
            print("warning: cannot read %s: %s" % (path, exc), file=sys.stderr)
            continue
        with fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    print("warning: %s:%d: not JSON, skipped" % (path, lineno), file=sys.stderr)
                    continue
                if not isinstance(rec, dict):
                    continue
                impl = rec.get("impl")
                preset = rec.get("preset")
                try:
                    ep = int(rec.get("ep"))
                    tokens = int(rec.get("tokens"))
                except (TypeError, ValueError):
                    print("warning: %s:%d: no integer ep/tokens, skipped" % (path, lineno),
                          file=sys.stderr)
                    continue
                if impl not in (MEGAMOE, NAIVE) or preset is None:
                    continue
                table.setdefault((str(preset), ep), {}).setdefault(tokens, {})[impl] = rec
    return table


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(table):
    out = []
    for (preset, ep) in sorted(table):
        rows = table[(preset, ep)]
        out.append("preset %s, ep %d" % (preset, ep))
        header = ("T", "megamoe us", "naive us", "speedup", "floor us", "megamoe/floor")
        lines = []
        for T in sorted(rows):
            mm = rows[T].get(MEGAMOE, {})
            nv = rows[T].get(NAIVE, {})
            mm_us = _number(mm.get("latency_us"))
            nv_us = _number(nv.get("latency_us"))
            floor = _number(mm.get("floor_us"))
            speedup = nv_us / mm_us if (mm_us and nv_us) else None
            vs_floor = mm_us / floor if (mm_us and floor) else None
            lines.append((str(T), _fmt(mm_us, ".1f"), _fmt(nv_us, ".1f"),
                          _fmt(speedup, ".2f") + ("x" if speedup else ""),
                          _fmt(floor, ".1f"), _fmt(vs_floor, ".2f") + ("x" if vs_floor else "")))
        widths = [max([len(header[i])] + [len(r[i]) for r in lines]) for i in range(len(header))]
        fmt_row = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
        out.append(fmt_row(header))
        out.append("  ".join("-" * w for w in widths))
        out.extend(fmt_row(r) for r in lines)
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Compare megamoe with the naive PyTorch EP layer.")
    p.add_argument("files", nargs="+", help="JSONL files with naive_torch and/or megamoe lines")
    args = p.parse_args(argv)
    table = load(args.files)
    if not table:
        print("no naive_torch or megamoe results found", file=sys.stderr)
        return 1
    sys.stdout.write(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
