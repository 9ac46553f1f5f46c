"""Shared fixtures of the megamoe Python tests.

The tests import the package from this checkout (python/), which finds libmegamoe.so through its
usual search (MEGAMOE_LIBRARY, the package's lib/, then <repo>/build/lib). Set MEGAMOE_TEST_INSTALLED=1
to test an installed package instead.

Skips, and when they become failures:
- libmegamoe.so not built: every test that needs it is skipped, unless MEGAMOE_REQUIRE_LIBRARY=1 (CI).
- PyTorch missing, no CUDA GPU, or not a Hopper GPU: the GPU tests are skipped, unless
  MEGAMOE_REQUIRE_GPU=1 (the GPU machines).
"""

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("MEGAMOE_TEST_INSTALLED") != "1":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megamoe import _lib  # noqa: E402

REQUIRE_LIBRARY = os.environ.get("MEGAMOE_REQUIRE_LIBRARY") == "1"
REQUIRE_GPU = os.environ.get("MEGAMOE_REQUIRE_GPU") == "1"


def load_library_or_skip():
    try:
        return _lib.get()
    except _lib.LibraryNotFoundError as e:
        if REQUIRE_LIBRARY or REQUIRE_GPU:
            pytest.fail("libmegamoe.so is required here (MEGAMOE_REQUIRE_LIBRARY/MEGAMOE_REQUIRE_GPU=1): %s" % e,
                        pytrace=False)
        pytest.skip("libmegamoe.so is not built (set MEGAMOE_REQUIRE_LIBRARY=1 to fail instead): %s" % e)


@pytest.fixture(scope="session")
def lib():
    return load_library_or_skip()


def pytest_report_header(config):
    try:
        path = _lib.find_library()
    except _lib.LibraryNotFoundError as e:
        return "megamoe: library not found (%s)" % e
    return "megamoe: library %s" % path
