"""scripts/gpu-check.sh's step runner without a GPU: its functions run steps that pass, that outlive
their limit, and one that outlives it with HANG_DUMP_S set, whose log must then tell which processes
were still running and in which threads, before the limit stops them all (a child's child too). Then
the whole script's sanitize step, with stand-ins for compute-sanitizer, nvidia-smi and the binaries:
SANITIZE_IMPLS picks the implementations (each with its environment), SANITIZE_REPEAT the runs."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def script_functions(names):
    """The bash text of the named top-level functions of scripts/gpu-check.sh."""
    text = open(os.path.join(ROOT, "scripts", "gpu-check.sh")).read()
    parts = []
    for name in names:
        match = re.search(r"^%s\(\) \{.*?^\}$" % re.escape(name), text, re.S | re.M)
        if not match:
            raise AssertionError(f"scripts/gpu-check.sh has no function {name}()")
        parts.append(match.group(0))
    return "\n".join(parts)


def check_sanitize_step(work):
    """The failures of `gpu-check.sh sanitize` run with stand-ins (an empty list: none)."""
    bin_dir, fake_path = os.path.join(work, "bin"), os.path.join(work, "path")
    os.makedirs(bin_dir)
    os.makedirs(fake_path)
    programs = {
        os.path.join(bin_dir, "megamoe"): "exit 0",
        os.path.join(bin_dir, "test_gpu_layer"): 'echo "test run: $*"',
        # Shows the environment the step gave it, then runs the program after its 4 options.
        os.path.join(fake_path, "compute-sanitizer"):
            'echo "sanitizer impl=$MEGAMOE_IMPL pool=$MEGAMOE_POOL_ROWS ranks=$MEGAMOE_TEST_RANKS"; shift 4; exec "$@"',
        os.path.join(fake_path, "nvidia-smi"): 'echo "stand-in GPU"',
    }
    for path, body in programs.items():
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body + "\n")
        os.chmod(path, 0o755)
    failures = []
    runs = (("repeat", {"SANITIZE_IMPLS": "staged fused-pool256", "SANITIZE_REPEAT": "2"},
             ["sanitize-staged-racecheck-1", "sanitize-staged-racecheck-2", "sanitize-fused-pool256-racecheck-1",
              "sanitize-fused-pool256-racecheck-2"]),
            ("default", {}, ["sanitize-staged-racecheck", "sanitize-fused-racecheck", "sanitize-fused-pool256-racecheck"]))
    for name, extra, expected in runs:
        out = os.path.join(work, "sanitize-" + name)
        # The caller's knobs of the step (a SANITIZE_FILTER, a HANG_DUMP_S) would change what it runs.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SANITIZE_") and k not in ("HANG_DUMP_S", "MAX_STEP_S", "GTEST_FILTER")}
        env.update(PATH=fake_path + os.pathsep + os.environ["PATH"], OUT=out, BIN=bin_dir, GPUS="1",
                   SANITIZE_TOOLS="racecheck", **extra)
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu-check.sh"), "sanitize"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        steps = re.findall(r"^(sanitize-\S+)\s+rc=0\b", open(os.path.join(out, "summary.txt")).read(), re.M)
        if steps != expected:
            failures.append(f"sanitize ({name}): steps {steps}, expected {expected}")
        logs = subprocess.run(["tar", "-xzOf", os.path.join(out, "logs.tar.gz")], capture_output=True,
                              text=True).stdout
        for impl, pool in (("staged", 0), ("fused", 256)) if name == "repeat" else (("fused", 0),):
            if f"sanitizer impl={impl} pool={pool} ranks=2" not in logs:
                failures.append(f"sanitize ({name}): no run with MEGAMOE_IMPL={impl} MEGAMOE_POOL_ROWS={pool}:\n{logs}")
        if "test run: --gtest_filter=Layer*.Tiny*:Layer*.Deterministic*" not in logs:
            failures.append(f"sanitize ({name}): the tests did not run with the default filter:\n{logs}")
    return failures


def main():
    for tool in ("timeout", "pgrep"):
        if not shutil.which(tool):
            print(f"SKIPPED: {tool} is not installed")
            return 77
    work = tempfile.mkdtemp(prefix="gpu_check_steps_")
    try:
        out = os.path.join(work, "out")
        os.makedirs(os.path.join(out, "logs"))
        # A program of our own name for the hung step: a copy of sleep, run as a child and a grandchild.
        hung = os.path.join(work, "fake_hang")
        shutil.copy(shutil.which("sleep"), hung)
        driver = "\n".join([
            "set -u",
            f"OUT='{out}'",
            ': > "$OUT/summary.txt"; : > "$OUT/all.log"; summary=()',
            script_functions(["dump_processes", "step"]),
            "HANG_DUMP_S=2",
            f"step hung 5 bash -c '{hung} 100 & {hung} 101'",
            "step quick 5 true",
            "unset HANG_DUMP_S",
            f"step cut 2 {hung} 102",
        ])
        start = time.time()
        subprocess.run(["bash", "-c", driver], check=True, stdout=subprocess.DEVNULL, timeout=120)
        elapsed = time.time() - start

        summary = open(os.path.join(out, "summary.txt")).read()
        failures = []
        for name, rc in (("hung", 124), ("quick", 0), ("cut", 124)):
            if not re.search(r"^%s\s+rc=%d\b" % (name, rc), summary, re.M):
                failures.append(f"summary: step {name} should have rc={rc}:\n{summary}")
        hung_log = open(os.path.join(out, "logs", "hung.log")).read()
        if "still running 2 s before the step's limit" not in hung_log:
            failures.append("hung.log: no dump before the limit:\n" + hung_log)
        for arg in ("100", "101"):  # both sleeping programs, with their threads
            if not re.search(r"^--- pid \d+: %s %s" % (re.escape(hung), arg), hung_log, re.M):
                failures.append(f"hung.log: no entry for '{hung} {arg}':\n" + hung_log)
        if not re.search(r"^  thread \d+ fake_hang state S", hung_log, re.M):
            failures.append("hung.log: no thread line of the hung programs:\n" + hung_log)
        cut_log = open(os.path.join(out, "logs", "cut.log")).read()
        if "still running" in cut_log:
            failures.append("cut.log: a dump without HANG_DUMP_S:\n" + cut_log)
        left = subprocess.run(["pgrep", "-f", hung], capture_output=True, text=True).stdout.split()
        if left:
            failures.append(f"processes left running after their steps' limits: {left}")
        if elapsed > 60:
            failures.append(f"the three steps took {elapsed:.0f} s (limits 5 + 5 + 2 s)")
        failures += check_sanitize_step(work)
        for f in failures:
            print("FAILED:", f)
        if failures:
            return 1
        print(f"gpu-check steps: dump, rc and clean-up as expected ({elapsed:.1f} s); the sanitize step's runs too")
        return 0
    finally:
        subprocess.run(["pkill", "-9", "-f", work], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
