#!/usr/bin/env python3
"""Compare megamoe against the naive PyTorch EP layers, bf16 and fp8, and against its own torch op.

Reads one or more JSONL files (one JSON object per line) holding results of
the benchmarks:
  naive_torch:     {"impl": "naive_torch", "dtype": "bf16", "preset", "experts", "ep",
                    "tokens", "latency_us", "min_us", ...}
  naive_torch_fp8: {"impl": "naive_torch_fp8", "dtype": "fp8", ...}
  megamoe:         {"impl": "megamoe", "dtype": "bf16"|"fp8", "variant": "staged"...,
                    "preset", "experts", "ep", "tokens", "latency_us", "tflops",
                    "floor_us", "vs_floor", "tile_floor_us", "vs_tile_floor", ...}
  the torch op:    {"impl": "megamoe-torch-op", "variant": "graph"|"eager", "dtype", ...}
                   (bench/op_bench.py: the same layer through torch.ops.megamoe.forward)
Lines without "impl", "preset" or "latency_us" are ignored; any other impl
gets a column too.  Every line is keyed by (impl, dtype, variant); a missing dtype means bf16
("naive_torch_fp8" means fp8), a missing variant means "".  Lines without
"experts" take the preset's expert count.  One table is printed per
(preset, ep, experts), one row per T, with:
  - a latency column (us, median) for every (impl, dtype, variant) present,
    megamoe first, then naive_torch, then anything else (the torch op's
    graph and eager lines: the op columns below);
  - speedups, where both sides are present:
      "bf16 vs naive" = naive bf16 / megamoe bf16,
      "fp8 vs naive"  = naive fp8  / megamoe fp8,
      "fp8 vs bf16"   = megamoe bf16 / megamoe fp8;
  - the roofline floor and latency/floor of megamoe bf16 and megamoe fp8;
  - where the torch op's lines are present, right after megamoe's columns of
    their dtype: "<dtype> op graph us" and "<dtype> op eager us" (the op's
    latency under CUDA-graph replay and called eagerly) and "<dtype> op / C++"
    = op graph / megamoe <dtype> (1 when the op adds nothing to the layer).
For the speedups, floors and "op / C++", "megamoe <dtype>" is the variant ""
line when there is one for that table, else "staged", else the alphabetically first variant
(named in the table's heading).  Missing values show as "-".  When a key appears more
than once for the same T, the line read last wins (files are read in the
order given).

Usage: python3 bench/compare.py out.jsonl [more.jsonl ...]
       python3 bench/compare.py --self-test
Plain Python 3.8+, standard library only.
"""

import argparse
import io
import json
import math
import os
import sys
import tempfile

MEGAMOE = "megamoe"
NAIVE = "naive_torch"
NAIVE_FP8 = "naive_torch_fp8"
OP = "megamoe-torch-op"
OP_VARIANTS = ("graph", "eager")

# Expert count of each preset (bench/naive_ep.py PRESETS, src/core presets),
# for lines that do not carry "experts".
PRESET_EXPERTS = {"dsv3": 256, "dsv4-flash": 256, "dsv4-pro": 384, "tiny": 16}

IMPL_ORDER = {MEGAMOE: 0, NAIVE: 1, NAIVE_FP8: 1}
DTYPE_ORDER = {"bf16": 0, "fp8": 1}


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


def record_key(rec):
    """(impl, dtype, variant) of a result line, with the defaults applied."""
    impl = str(rec.get("impl"))
    dtype = rec.get("dtype")
    if dtype is None:
        dtype = "fp8" if impl == NAIVE_FP8 else "bf16"
    variant = rec.get("variant")
    return impl, str(dtype).lower(), "" if variant is None else str(variant)


def load_lines(lines, source="<lines>", table=None):
    """Add result lines to {(preset, ep, experts): {tokens: {key: record}}}."""
    if table is None:
        table = {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            print("warning: %s:%d: not JSON, skipped" % (source, lineno), file=sys.stderr)
            continue
        if not isinstance(rec, dict):
            continue
        impl = rec.get("impl")
        preset = rec.get("preset")
        if impl is None or preset is None or "latency_us" not in rec:
            continue  # not a layer-latency result
        try:
            ep = int(rec.get("ep"))
            tokens = int(rec.get("tokens"))
        except (TypeError, ValueError):
            print("warning: %s:%d: no integer ep/tokens, skipped" % (source, lineno), file=sys.stderr)
            continue
        experts = rec.get("experts")
        try:
            experts = int(experts) if experts is not None else PRESET_EXPERTS.get(str(preset))
        except (TypeError, ValueError):
            experts = PRESET_EXPERTS.get(str(preset))
        group = (str(preset), ep, experts)
        table.setdefault(group, {}).setdefault(tokens, {})[record_key(rec)] = rec
    return table


def load(paths):
    table = {}
    for path in paths:
        try:
            fh = open(path, "r")
        except OSError as exc:
            print("warning: cannot read %s: %s" % (path, exc), file=sys.stderr)
            continue
        with fh:
            load_lines(fh, path, table)
    return table


def _key_order(key):
    impl, dtype, variant = key
    return (IMPL_ORDER.get(impl, 2), impl, DTYPE_ORDER.get(dtype, 2), dtype, variant)


def _label(key):
    impl, dtype, variant = key
    name = {MEGAMOE: "megamoe", NAIVE: "naive", NAIVE_FP8: "naive"}.get(impl, impl)
    label = "%s %s" % (name, dtype)
    if variant:
        label += "/" + variant
    return label + " us"


def _primary(keys, impl, dtype):
    """The key used for speedups: variant "", else "staged" (the reference path), else the first."""
    cands = sorted(k for k in keys if k[0] == impl and k[1] == dtype)
    for preferred in ("", "staged"):
        for k in cands:
            if k[2] == preferred:
                return k
    return cands[0] if cands else None


def _naive_key(keys, dtype):
    impl = NAIVE_FP8 if dtype == "fp8" else NAIVE
    return _primary(keys, impl, dtype) or _primary(keys, NAIVE, dtype) or _primary(keys, NAIVE_FP8, dtype)


def _ratio(num, den):
    return num / den if (num and den) else None


def _fmt(v, spec, suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def table_for(rows):
    """(title note, header, data rows) of one (preset, ep, experts) group."""
    keys = sorted({k for by_key in rows.values() for k in by_key}, key=_key_order)
    # The op's graph and eager lines get columns of their own, beside megamoe's.
    op_keys = [k for k in keys if k[0] == OP and k[2] in OP_VARIANTS]
    keys = [k for k in keys if k not in op_keys]
    mm16, mm8 = _primary(keys, MEGAMOE, "bf16"), _primary(keys, MEGAMOE, "fp8")
    nv16, nv8 = _naive_key(keys, "bf16"), _naive_key(keys, "fp8")
    uses = ["%s = %s" % (dt, "megamoe/" + k[2]) for dt, k in (("bf16", mm16), ("fp8", mm8))
            if k is not None and k[2]]
    notes = ""
    if uses:
        what = "speedups, floors and op / C++" if op_keys else "speedups and floors"
        notes = "%s use %s" % (what, ", ".join(uses))

    def lat(by_key, key):
        return _number(by_key.get(key, {}).get("latency_us")) if key else None

    def floor(by_key, key):
        return _number(by_key.get(key, {}).get("floor_us")) if key else None

    def op_cols(dt):
        graph, eager, cpp = (OP, dt, "graph"), (OP, dt, "eager"), _primary(keys, MEGAMOE, dt)
        out = []
        if graph in op_keys:
            out.append(("%s op graph us" % dt, lambda r: _fmt(lat(r, graph), ".1f")))
            if cpp:
                out.append(("%s op / C++" % dt, lambda r: _fmt(_ratio(lat(r, graph), lat(r, cpp)), ".3f", "x")))
        if eager in op_keys:
            out.append(("%s op eager us" % dt, lambda r: _fmt(lat(r, eager), ".1f")))
        return out

    op_dtypes = []  # in key order, each once
    for k in op_keys:
        if k[1] not in op_dtypes:
            op_dtypes.append(k[1])
    # (header, function of the T's records -> text); a derived column only
    # appears when both of its sides are in this table.
    cols = [("T", None)]
    megamoe_keys = [k for k in keys if k[0] == MEGAMOE]
    for i, k in enumerate(megamoe_keys):
        cols.append((_label(k), lambda r, k=k: _fmt(lat(r, k), ".1f")))
        last_of_dtype = i + 1 == len(megamoe_keys) or megamoe_keys[i + 1][1] != k[1]
        if last_of_dtype and k[1] in op_dtypes:
            cols.extend(op_cols(k[1]))
            op_dtypes.remove(k[1])
    for dt in op_dtypes:  # op lines without a megamoe line of their dtype
        cols.extend(op_cols(dt))
    for k in (k for k in keys if k[0] != MEGAMOE):
        cols.append((_label(k), lambda r, k=k: _fmt(lat(r, k), ".1f")))
    if mm16 and nv16:
        cols.append(("bf16 vs naive", lambda r: _fmt(_ratio(lat(r, nv16), lat(r, mm16)), ".2f", "x")))
    if mm8 and nv8:
        cols.append(("fp8 vs naive", lambda r: _fmt(_ratio(lat(r, nv8), lat(r, mm8)), ".2f", "x")))
    if mm8 and mm16:
        cols.append(("fp8 vs bf16", lambda r: _fmt(_ratio(lat(r, mm16), lat(r, mm8)), ".2f", "x")))
    for dt, k in (("bf16", mm16), ("fp8", mm8)):
        if k is not None:
            cols.append(("%s floor us" % dt, lambda r, k=k: _fmt(floor(r, k), ".1f")))
            cols.append(("%s /floor" % dt,
                         lambda r, k=k: _fmt(_ratio(lat(r, k), floor(r, k)), ".2f", "x")))
    header = [c[0] for c in cols]
    data = []
    for T in sorted(rows):
        data.append([str(T)] + [fn(rows[T]) for _, fn in cols[1:]])
    return notes, header, data


def render(table):
    out = []
    for group in sorted(table, key=lambda g: (g[0], g[1], -1 if g[2] is None else g[2])):
        preset, ep, experts = group
        notes, header, data = table_for(table[group])
        title = "preset %s, ep %d, experts %s" % (preset, ep, "-" if experts is None else experts)
        if notes:
            title += " (" + notes + ")"
        out.append(title)
        widths = [max([len(header[i])] + [len(r[i]) for r in data]) for i in range(len(header))]
        fmt_row = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
        out.append(fmt_row(header))
        out.append("  ".join("-" * w for w in widths))
        out.extend(fmt_row(r) for r in data)
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Self-test: synthetic lines in, checked table out.
# --------------------------------------------------------------------------


def _cells(text, title):
    """{T: {column: cell}} of the table under the heading starting with title."""
    lines = text.split("\n")
    starts = [i for i, ln in enumerate(lines) if ln.startswith(title)]
    if len(starts) != 1:
        raise AssertionError("expected one table titled %r, found %d:\n%s" % (title, len(starts), text))
    i = starts[0]
    header_line, rule = lines[i + 1], lines[i + 2]
    # Column spans come from the dashed rule (headers contain spaces).
    spans, pos = [], 0
    for dashes in rule.split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    header = [header_line[a:b].strip() for a, b in spans]
    result = {}
    for ln in lines[i + 3:]:
        if not ln.strip():
            break
        cells = [ln[a:b].strip() for a, b in spans]
        result[int(cells[0])] = dict(zip(header, cells))
    return result


def self_test():
    def line(**kw):
        return json.dumps(kw)

    lines = [
        # dsv4-flash, ep 1, 256 experts: all four impls, plus a staged variant.
        line(impl="megamoe", dtype="bf16", preset="dsv4-flash", experts=256, ep=1, tokens=64,
             latency_us=100.0, floor_us=50.0),
        line(impl="megamoe", dtype="fp8", preset="dsv4-flash", experts=256, ep=1, tokens=64,
             latency_us=80.0, floor_us=40.0),
        line(impl="megamoe", dtype="bf16", variant="staged", preset="dsv4-flash", experts=256, ep=1,
             tokens=64, latency_us=130.0, floor_us=50.0),
        line(impl="naive_torch", preset="dsv4-flash", ep=1, tokens=64, latency_us=400.0),  # old line: no dtype, no experts
        line(impl="naive_torch_fp8", dtype="fp8", preset="dsv4-flash", experts=256, ep=1, tokens=64,
             latency_us=320.0),
        # T=512: naive fp8 missing; the first naive bf16 line is superseded by the later one.
        line(impl="naive_torch", dtype="bf16", preset="dsv4-flash", experts=256, ep=1, tokens=512,
             latency_us=999.0),
        line(impl="megamoe", preset="dsv4-flash", experts=256, ep=1, tokens=512,
             latency_us=200.0, floor_us=100.0),  # no dtype: bf16
        line(impl="megamoe", dtype="fp8", preset="dsv4-flash", experts=256, ep=1, tokens=512,
             latency_us=125.0, floor_us=62.5),
        line(impl="naive_torch", dtype="bf16", preset="dsv4-flash", experts=256, ep=1, tokens=512,
             latency_us=600.0),
        # Same preset and ep, 32 experts (megamoe --experts 32): its own table.
        line(impl="megamoe", dtype="fp8", preset="dsv4-flash", experts=32, ep=1, tokens=64,
             latency_us=30.0, floor_us=15.0),
        # Only a staged fp8 variant, and naive fp8, in dsv3 ep 8.
        line(impl="megamoe", dtype="fp8", variant="staged", preset="dsv3", experts=256, ep=8, tokens=1,
             latency_us=50.0, floor_us=25.0),
        line(impl="naive_torch_fp8", preset="dsv3", ep=8, tokens=1, latency_us=500.0),  # no dtype: fp8
        # dsv4-pro, ep 2: megamoe staged, both dtypes, and the torch op beside it (bf16: graph
        # only; fp8: graph and eager; T=64: no fp8 op graph line).
        line(impl="megamoe", dtype="bf16", variant="staged", preset="dsv4-pro", experts=384, ep=2, tokens=1,
             latency_us=200.0, floor_us=100.0),
        line(impl="megamoe", dtype="fp8", variant="staged", preset="dsv4-pro", experts=384, ep=2, tokens=1,
             latency_us=160.0, floor_us=80.0),
        line(impl="megamoe", dtype="fp8", variant="staged", preset="dsv4-pro", experts=384, ep=2, tokens=64,
             latency_us=400.0, floor_us=200.0),
        line(impl="megamoe-torch-op", variant="graph", dtype="bf16", preset="dsv4-pro", experts=384, ep=2, tokens=1,
             latency_us=201.0),
        line(impl="megamoe-torch-op", variant="graph", dtype="fp8", preset="dsv4-pro", experts=384, ep=2, tokens=1,
             latency_us=158.4),
        line(impl="megamoe-torch-op", variant="eager", dtype="fp8", preset="dsv4-pro", experts=384, ep=2, tokens=1,
             latency_us=230.0),
        line(impl="megamoe-torch-op", variant="eager", dtype="fp8", preset="dsv4-pro", experts=384, ep=2, tokens=64,
             latency_us=450.0),
        # The op alone (tiny, ep 1): its columns, no ratio.
        line(impl="megamoe-torch-op", variant="graph", dtype="bf16", preset="tiny", experts=16, ep=1, tokens=8,
             latency_us=20.0),
        # Junk that must be skipped.
        "not json",
        line(impl="megamoe", preset="dsv3", ep="x", tokens=1, latency_us=1.0),
        line(impl="megamoe", dtype="bf16", preset="dsv3", experts=256, ep=8, tokens=1, latency_us=float("nan")),
        "",
    ]
    # Through a real file, as main() reads it.
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        saved, sys.stderr = sys.stderr, io.StringIO()
        try:
            table = load([path])
            warnings = sys.stderr.getvalue()
        finally:
            sys.stderr = saved
    finally:
        os.unlink(path)
    text = render(table)

    def check(cond, what):
        if not cond:
            raise AssertionError("%s\n--- table ---\n%s" % (what, text))

    check(warnings.count("warning:") == 2 and "not JSON" in warnings and "ep/tokens" in warnings,
          "expected two warnings (junk lines), got:\n" + warnings)
    check(set(table) == {("dsv4-flash", 1, 256), ("dsv4-flash", 1, 32), ("dsv3", 8, 256), ("dsv4-pro", 2, 384),
                         ("tiny", 1, 16)},
          "groups: %r" % sorted(table, key=str))

    t = _cells(text, "preset dsv4-flash, ep 1, experts 256")
    r = t[64]
    check(r["megamoe bf16 us"] == "100.0", "megamoe bf16 at T=64")
    check(r["megamoe bf16/staged us"] == "130.0", "megamoe staged at T=64")
    check(r["megamoe fp8 us"] == "80.0", "megamoe fp8 at T=64")
    check(r["naive bf16 us"] == "400.0", "naive bf16 (line without dtype/experts) at T=64")
    check(r["naive fp8 us"] == "320.0", "naive fp8 at T=64")
    check(r["bf16 vs naive"] == "4.00x", "bf16 speedup at T=64")
    check(r["fp8 vs naive"] == "4.00x", "fp8 speedup at T=64")
    check(r["fp8 vs bf16"] == "1.25x", "fp8 vs bf16 at T=64")
    check(r["bf16 floor us"] == "50.0" and r["bf16 /floor"] == "2.00x", "bf16 floor at T=64")
    check(r["fp8 floor us"] == "40.0" and r["fp8 /floor"] == "2.00x", "fp8 floor at T=64")
    r = t[512]
    check(r["naive bf16 us"] == "600.0", "last line wins at T=512")
    check(r["naive fp8 us"] == "-" and r["fp8 vs naive"] == "-", "missing naive fp8 at T=512")
    check(r["fp8 vs bf16"] == "1.60x" and r["bf16 vs naive"] == "3.00x", "speedups at T=512")
    check(r["megamoe bf16/staged us"] == "-", "missing staged at T=512")
    header = text.split("\n")[text.split("\n").index(
        [ln for ln in text.split("\n") if ln.startswith("preset dsv4-flash, ep 1, experts 256")][0]) + 1]
    order = [header.index(c) for c in ("megamoe bf16 us", "megamoe bf16/staged us", "megamoe fp8 us",
                                       "naive bf16 us", "naive fp8 us")]
    check(order == sorted(order), "column order")

    t = _cells(text, "preset dsv4-flash, ep 1, experts 32")
    check(t[64]["megamoe fp8 us"] == "30.0" and "fp8 vs naive" not in t[64], "32-expert table")

    t = _cells(text, "preset dsv3, ep 8, experts 256 (speedups and floors use fp8 = megamoe/staged)")
    r = t[1]
    check(r["megamoe fp8/staged us"] == "50.0" and r["naive fp8 us"] == "500.0", "dsv3 latencies")
    check(r["fp8 vs naive"] == "10.00x" and r["fp8 /floor"] == "2.00x", "staged variant as primary")
    check(r["megamoe bf16 us"] == "-", "NaN latency shows as -")
    check(r.get("bf16 vs naive") is None, "no bf16 speedup without naive bf16")
    check(not any(" op " in c for c in r), "no op columns without op lines")

    title = "preset dsv4-pro, ep 2, experts 384 (speedups, floors and op / C++ use bf16 = megamoe/staged, " \
            "fp8 = megamoe/staged)"
    t = _cells(text, title)
    r = t[1]
    check(r["bf16 op graph us"] == "201.0" and r["bf16 op / C++"] == "1.005x", "bf16 op at T=1")
    check("bf16 op eager us" not in r, "no bf16 eager column without bf16 eager lines")
    check(r["fp8 op graph us"] == "158.4" and r["fp8 op / C++"] == "0.990x" and r["fp8 op eager us"] == "230.0",
          "fp8 op at T=1")
    check(not any(c.startswith("megamoe-torch-op") for c in r), "op lines only in their own columns")
    r = t[64]
    check(r["fp8 op graph us"] == "-" and r["fp8 op / C++"] == "-" and r["fp8 op eager us"] == "450.0",
          "missing op graph at T=64")
    lines_of = text.split("\n")
    header = lines_of[lines_of.index(title) + 1]
    order = [header.index(c) for c in ("megamoe bf16/staged us", "bf16 op graph us", "bf16 op / C++",
                                       "megamoe fp8/staged us", "fp8 op graph us", "fp8 op / C++",
                                       "fp8 op eager us", "fp8 vs bf16")]
    check(order == sorted(order), "op columns beside megamoe's of their dtype")

    t = _cells(text, "preset tiny, ep 1, experts 16")
    check(t[8] == {"T": "8", "bf16 op graph us": "20.0"}, "op lines alone: %r" % t[8])

    keys = {(MEGAMOE, "fp8", "fused"), (MEGAMOE, "fp8", "staged"), (MEGAMOE, "fp8", "staged+zeroing-full")}
    check(_primary(keys, MEGAMOE, "fp8") == (MEGAMOE, "fp8", "staged"), "staged is the primary beside fused")
    check(_primary({(MEGAMOE, "fp8", "fused")}, MEGAMOE, "fp8") == (MEGAMOE, "fp8", "fused"), "fused alone")

    sys.stdout.write(text)
    print("self-test passed")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="Compare megamoe with the naive PyTorch EP layers and with its torch op.")
    p.add_argument("files", nargs="*", help="JSONL files with megamoe, megamoe-torch-op and/or naive_torch[_fp8] lines")
    p.add_argument("--self-test", action="store_true", help="check the tables on synthetic lines")
    args = p.parse_args(argv)
    if args.self_test:
        return self_test()
    if not args.files:
        p.error("give at least one JSONL file (or --self-test)")
    table = load(args.files)
    if not table:
        print("no latency results (megamoe, naive_torch, naive_torch_fp8, ...) found", file=sys.stderr)
        return 1
    sys.stdout.write(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
