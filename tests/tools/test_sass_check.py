#!/usr/bin/env python3
"""scripts/sass_check.py on small cuobjdump-style listings: the innermost loop around a wgmma is
found from its backward branch; a grouped-GEMM kernel with a spill inside it fails the check, one
with spills elsewhere or a fused kernel does not; R2UR inside the loop is counted."""
import contextlib
import io
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import sass_check  # noqa: E402

GEMM = "_ZN7megamoe4gemm19grouped_gemm_kernelINS0_17GroupedGemmConfigINS0_11Fp8OperandsELi256ELi1ENS_3moe17SwigluFp8EpilogueE"
FUSED = "_ZN7megamoe3moe20fused_forward_kernelINS_4gemm11Fp8OperandsELi1ELi256ELb1EEEv14CUtensorMap_st"


def listing(name, body):
    """A kernel whose instructions are `body`, one per 16 bytes from 0x0, in cuobjdump's layout."""
    lines = [f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"']
    for i, text in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;" + " " * 20 + "/* 0x000000000000 */")
        lines.append(" " * 98 + "/* 0x000fe20000000f00 */")
    return "\n".join(lines) + "\n"


# A loop from 0x20 to its backward branch at 0x60, with a wgmma inside; a spill before it.
def kernel_body(in_loop="NOP", after_loop="NOP"):
    return ["STL [R1], R2", "MOV R3, RZ",                                    # 0x00, 0x10
            "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R5",                   # 0x20: loop head
            "QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24",             # 0x30
            in_loop,                                                          # 0x40
            "WARPGROUP.DEPBAR.LE gsb0, 0x0",                                  # 0x50
            "@P1 BRA 0x20",                                                   # 0x60: back to the head
            after_loop, "EXIT"]                                               # 0x70, 0x80


def run(text):
    with tempfile.NamedTemporaryFile("w", suffix=".sass", delete=False) as f:
        f.write(text)
    out = io.StringIO()
    sys.argv = ["sass_check.py", "--listing", f.name]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = sass_check.main()
    finally:
        os.unlink(f.name)
    return code, out.getvalue()


class SassCheck(unittest.TestCase):
    def test_the_loop_is_the_backward_branchs_span(self):
        code = sass_check.kernels(listing(GEMM, kernel_body()))[GEMM]
        self.assertEqual(sass_check.wgmma_loops(code), [(0x20, 0x60)])
        s = sass_check.summary(code)
        self.assertEqual((s["wgmma"], s["local"], s["local_in_loops"]), (1, 1, 0))

    def test_spills_outside_the_loop_pass(self):
        code, out = run(listing(GEMM, kernel_body(after_loop="LDL R4, [R1]")))
        self.assertEqual(code, 0, out)
        self.assertIn("fc1 fp8 BN 256 cluster 1", out)

    def test_a_spill_inside_the_loop_of_a_grouped_gemm_fails(self):
        code, out = run(listing(GEMM, kernel_body(in_loop="LDL.LU R4, [R1+0x8]")))
        self.assertEqual(code, 1)
        self.assertIn("local memory in a wgmma loop", out)

    def test_the_fused_kernel_is_reported_not_checked(self):
        code, out = run(listing(FUSED, kernel_body(in_loop="STL [R1+0x4], R4")))
        self.assertEqual(code, 0, out)
        self.assertIn("fused fp8 BN 256 cluster 1 windowed", out)

    def test_r2ur_inside_the_loop_is_counted(self):
        code = sass_check.kernels(listing(GEMM, kernel_body(in_loop="R2UR UR9, R7")))[GEMM]
        self.assertEqual(sass_check.summary(code)["r2ur_in_loops"], 1)


if __name__ == "__main__":
    unittest.main()
