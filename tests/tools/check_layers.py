#!/usr/bin/env python3
"""ctest `layers`: includes run one way, cli -> layer -> {moe, gemm} -> comm -> runtime -> core -> include.

Every quoted #include in src/ and bench/cuda/ must name a folder at or below the including file's
folder in that order (or a file of its own folder). Prints each upward include and fails if any.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Each folder and what it may include besides itself.
BELOW = {
    "core": {"megamoe"},
    "runtime": {"core", "megamoe"},
    "comm": {"runtime", "core", "megamoe"},
    "gemm": {"comm", "runtime", "core", "megamoe"},
    "moe": {"gemm", "comm", "runtime", "core", "megamoe"},
    "layer": {"moe", "gemm", "comm", "runtime", "core", "megamoe"},
    "capi": {"megamoe"},
    "bench": {"comm", "runtime", "core", "megamoe"},
    "cli": {"bench", "layer", "moe", "gemm", "comm", "runtime", "core", "megamoe"},
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def folder_of(path):
    rel = path.relative_to(ROOT).parts
    return rel[1] if rel[0] == "src" else "bench"


def main():
    files = [p for p in (ROOT / "src").rglob("*") if p.suffix in {".h", ".cuh", ".cpp", ".cu"}]
    files += [p for p in (ROOT / "bench" / "cuda").rglob("*") if p.suffix in {".h", ".cuh", ".cpp", ".cu"}]
    bad = []
    for path in sorted(files):
        me = folder_of(path)
        for target in INCLUDE.findall(path.read_text()):
            parts = target.split("/")
            if len(parts) == 1:
                continue  # a file beside this one
            top = parts[0]
            if top == "bench" and len(parts) > 1:
                top = "bench"
            if top != me and top not in BELOW[me]:
                bad.append(f"{path.relative_to(ROOT)}: includes \"{target}\" ({me} may include {sorted(BELOW[me])})")
    for line in bad:
        print(line)
    print(f"{len(files)} files checked, {len(bad)} upward includes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
