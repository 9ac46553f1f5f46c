#!/usr/bin/env python3
"""bench/ncu_source_summary.py on a small Nsight-style CSV: one instruction inlined through two of our
lines counts at both lines, once in the kernel's total; lines outside src/ and include/ are left out."""
import contextlib
import csv
import io
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import ncu_source_summary  # noqa: E402

HEADER = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)",
          "Warp Stall Sampling (Not-issued Samples)", "stall_barrier", "stall_wait"]
KERNEL = "void megamoe::gemm::grouped_gemm_kernel<megamoe::gemm::GroupedGemmConfig<X>>(CUtensorMap_st)"


def block(path, lines):
    rows = [["File Path", path], ["Function Name", KERNEL], HEADER]
    for number, text, instructions in lines:
        total = sum(s for _, _, s, _, _ in instructions)
        rows.append([str(number), text, "-", "-", str(total), "0",
                     str(sum(b for *_, b, _ in instructions)), str(sum(w for *_, w in instructions))])
        for address, sass, samples, barrier, wait in instructions:
            rows.append(["", "", address, sass, str(samples), "0", str(barrier), str(wait)])
    return rows


class Summary(unittest.TestCase):
    def test_inlined_instruction_counts_at_each_of_our_lines_and_once_in_the_total(self):
        wait = ("0x10", "WARPGROUP.DEPBAR", 30, 30, 0)
        ffma = ("0x20", "FFMA", 10, 0, 10)
        rows = (block("/repo/src/gemm/grouped_gemm.cuh", [(550, "warpgroup_wait<0>();", [wait]),
                                                           (165, "promote", [ffma])])
                + block("/repo/.deps/cute/arch/mma_sm90_gmma.hpp", [(67, "wgmma.wait", [wait])])
                + block("/repo/src/moe/fc2.cuh", [(40, "epilogue call", [wait])]))
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
            f.write(text.getvalue())
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                sys.argv = ["ncu_source_summary.py", f.name]
                ncu_source_summary.main()
        finally:
            os.unlink(f.name)
        report = out.getvalue()
        self.assertIn("40 warp samples, 2 instructions", report)  # 0x10 once, 0x20 once
        self.assertIn("75.0%  src/gemm/grouped_gemm.cuh:550", report)
        self.assertIn("75.0%  src/moe/fc2.cuh:40", report)
        self.assertIn("25.0%  src/gemm/grouped_gemm.cuh:165", report)
        self.assertIn("[barrier 100%]", report)
        self.assertNotIn("mma_sm90_gmma", report)


if __name__ == "__main__":
    unittest.main()
