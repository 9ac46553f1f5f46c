"""Packaging of the megamoe Python bindings (metadata in pyproject.toml).

The wheel carries a prebuilt libmegamoe.so: build_py copies it from the repository's build output
(../build/lib/libmegamoe.so, made by ./scripts/build.sh), or from $MEGAMOE_LIBRARY when that is set,
into megamoe/lib/. pip never runs CMake; without a built library the install fails and says so.
Editable installs (pip install -e) copy nothing: the package then loads ../build/lib/libmegamoe.so
from the checkout at run time.

The wheel holds no CPython extension, so it is tagged py3-none-<platform>: one build for every
CPython >= 3.9.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "libmegamoe.so"


def built_library() -> Path:
    env = os.environ.get("MEGAMOE_LIBRARY")
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            path = path / LIBRARY_NAME
        if not path.is_file():
            raise SystemExit("error: MEGAMOE_LIBRARY=%s does not name an existing %s" % (env, LIBRARY_NAME))
        return path
    path = HERE.parent / "build" / "lib" / LIBRARY_NAME
    if not path.is_file():
        raise SystemExit(
            "error: %s not found. Build the native library first with ./scripts/build.sh (from the repository "
            "root), then run pip install ./python again; pip does not run CMake. (Or set MEGAMOE_LIBRARY to a "
            "built %s.)" % (path, LIBRARY_NAME))
    return path


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the checkout's build/lib/libmegamoe.so is found at run time
        source = built_library()
        target = Path(self.build_lib) / "megamoe" / "lib" / LIBRARY_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        print("megamoe: bundled %s" % source)


cmdclass = {"build_py": BuildPyWithLibrary}

try:  # setuptools >= 70.1 has bdist_wheel; older ones use the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:
    try:
        from wheel.bdist_wheel import bdist_wheel as _bdist_wheel
    except ImportError:
        _bdist_wheel = None

if _bdist_wheel is not None:

    class BdistWheelPlatform(_bdist_wheel):
        """A platform wheel (it holds a shared library) that any CPython 3 can use."""

        def finalize_options(self):
            super().finalize_options()
            self.root_is_pure = False

        def get_tag(self):
            _, _, platform = super().get_tag()
            return "py3", "none", platform

    cmdclass["bdist_wheel"] = BdistWheelPlatform

setup(cmdclass=cmdclass)
