"""Finding and loading libmegamoe.so, and the ctypes signatures of its C interface (c_api.h).

Search order (the first that applies wins; there is no silent fall-through past MEGAMOE_LIBRARY):
  1. the environment variable MEGAMOE_LIBRARY: the path of the library (or of a folder holding it);
  2. the copy inside the installed package: megamoe/lib/libmegamoe.so (``pip install ./python``);
  3. the repository's build output, for a checkout run with PYTHONPATH=python:
     <repo>/build/lib/libmegamoe.so.
"""

import ctypes
import os
import threading
from pathlib import Path
from typing import List, Optional, Tuple

ABI_VERSION = 2  # MEGAMOE_C_ABI_VERSION of the header these bindings were written for
LIBRARY_NAME = "libmegamoe.so"
ENV_LIBRARY = "MEGAMOE_LIBRARY"

STATUS_OK = 0
STATUS_INVALID_ARGUMENT = 1
STATUS_RUNTIME_ERROR = 2

FORMAT_BF16 = 0
FORMAT_FP8 = 1

IMPL_DEFAULT = 0  # MEGAMOE_IMPL from the environment, else staged
IMPL_STAGED = 1
IMPL_FUSED = 2

_PACKAGE_DIR = Path(__file__).resolve().parent


class LibraryNotFoundError(ImportError):
    """libmegamoe.so is not where megamoe looks for it (see the module docstring)."""


def candidate_paths() -> List[Tuple[str, Path]]:
    """(where, path) pairs in search order, as they apply in the current environment."""
    env = os.environ.get(ENV_LIBRARY)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            path = path / LIBRARY_NAME
        return [(ENV_LIBRARY, path)]
    return [
        ("the installed package", _PACKAGE_DIR / "lib" / LIBRARY_NAME),
        ("the repository's build output", _PACKAGE_DIR.parent.parent / "build" / "lib" / LIBRARY_NAME),
    ]


def find_library() -> Path:
    """The path of libmegamoe.so, or LibraryNotFoundError saying where it looked."""
    candidates = candidate_paths()
    for _, path in candidates:
        if path.is_file():
            return path
    tried = "; ".join("%s: %s" % (where, path) for where, path in candidates)
    if os.environ.get(ENV_LIBRARY):
        raise LibraryNotFoundError(
            "megamoe: %s=%s does not name an existing %s" % (ENV_LIBRARY, os.environ[ENV_LIBRARY], LIBRARY_NAME))
    raise LibraryNotFoundError(
        "megamoe: %s not found (looked in %s). Build it with ./scripts/build.sh, then reinstall the package "
        "(pip install ./python) or run from the checkout with PYTHONPATH=python, or set %s to its path."
        % (LIBRARY_NAME, tried, ENV_LIBRARY))


_c_int = ctypes.c_int
_c_i64 = ctypes.c_int64
_c_float = ctypes.c_float
_c_size = ctypes.c_size_t
_c_ptr = ctypes.c_void_p
_c_str = ctypes.c_char_p
_p_size = ctypes.POINTER(ctypes.c_size_t)
_p_i64 = ctypes.POINTER(ctypes.c_int64)
_p_int = ctypes.POINTER(ctypes.c_int)
_p_ptr = ctypes.POINTER(ctypes.c_void_p)
_SHAPE = [_c_i64, _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, _c_int, _c_float]

# name: (restype, argtypes)
_SIGNATURES = {
    "megamoe_version": (_c_str, []),
    "megamoe_abi_version": (_c_int, []),
    "megamoe_last_error": (_c_str, []),
    "megamoe_shape_validate": (_c_int, _SHAPE),
    "megamoe_preset": (_c_int, [_c_str, _p_i64, _p_i64, _p_i64, _p_i64, ctypes.POINTER(_c_float)]),
    "megamoe_workspace_table": (_c_int, _SHAPE + [_c_i64, _c_ptr, _c_size, _p_size]),  # shape, pool_rows, string
    "megamoe_compact_pool_rows": (_c_int, _SHAPE + [_p_i64]),
    "megamoe_largest_pool_rows_within": (_c_int, _SHAPE + [ctypes.c_uint64, _p_i64]),
    "megamoe_nccl_unique_id": (_c_int, [_c_ptr, _c_size, _p_size]),
    "megamoe_comm_create_nccl": (_c_int, [_c_int, _c_int, _c_int, _c_ptr, _c_size, _p_ptr]),
    "megamoe_comm_create_local": (_c_int, [_c_int, _p_ptr]),
    "megamoe_comm_destroy": (_c_int, [_c_ptr]),
    "megamoe_comm_info": (_c_int, [_c_ptr, _p_int, _p_int, _p_int]),
    # comm, hidden, intermediate, num_experts, top_k, max_tokens_per_rank, format, swiglu_limit, num_sms, impl,
    # pool_rows, out
    "megamoe_layer_create": (
        _c_int, [_c_ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, _c_int, _c_float, _c_int, _c_int, _c_i64, _p_ptr]),
    "megamoe_layer_destroy": (_c_int, [_c_ptr]),
    "megamoe_layer_load_weights": (_c_int, [_c_ptr, _c_int, _c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_ptr]),
    "megamoe_layer_load_expert_weights": (
        _c_int, [_c_ptr, _c_i64, _c_i64, _c_int, _c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_ptr]),
    # layer, x, x_scale, topk_ids, ids_int64, topk_weights, y, output_scale, num_tokens, num_tokens_device, stream
    "megamoe_layer_forward": (
        _c_int, [_c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_int, _c_ptr, _c_ptr, _c_float, _c_i64, _c_ptr, _c_ptr]),
    "megamoe_layer_check_errors": (_c_int, [_c_ptr]),
    "megamoe_layer_synchronize": (_c_int, [_c_ptr, _c_ptr]),
    "megamoe_layer_info": (_c_int, [_c_ptr, _p_int, _p_int, _p_int, _p_i64]),  # rank, num_sms, impl, pool_rows
    "megamoe_layer_workspace_table": (_c_int, [_c_ptr, _c_ptr, _c_size, _p_size]),
    "megamoe_quantize_weights_fp8": (_c_int, [_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr]),
}


class Library:
    """The loaded library: one attribute per C function, named without the megamoe_ prefix (ctypes
    function objects with their signatures set: lib.layer_forward(...) returns the int status)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.cdll = ctypes.CDLL(str(path))
        except OSError as e:
            raise OSError("megamoe: cannot load %s: %s" % (path, e)) from e
        missing = []
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(self.cdll, name)
            except AttributeError:
                missing.append(name)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name[len("megamoe_"):], fn)
        if missing:
            raise OSError("megamoe: %s lacks the C interface function(s) %s: was it built with src/capi/c_api.cpp?"
                          % (path, ", ".join(missing)))
        abi = self.abi_version()
        if abi != ABI_VERSION:
            raise OSError("megamoe: %s has C ABI version %d, these Python bindings need %d: rebuild the library "
                          "and reinstall the package from the same checkout" % (path, abi, ABI_VERSION))

    def error_message(self) -> str:
        """megamoe_last_error() as text."""
        message = self.last_error()
        return message.decode("utf-8", "replace") if message else ""

    def check(self, status: int) -> None:
        """Raises the exception of a non-zero status: 1 -> ValueError, else RuntimeError."""
        if status == STATUS_OK:
            return
        raise_status(self, status)

    def read_string(self, fn, *args, initial_capacity: int = 1 << 14) -> bytes:
        """Calls a (..., char* out, size_t cap, size_t* len) function, growing the buffer once if needed."""
        length = ctypes.c_size_t(0)
        capacity = initial_capacity
        for _ in range(2):
            buf = ctypes.create_string_buffer(capacity + 1)
            status = fn(*args, buf, capacity + 1, ctypes.byref(length))
            if status == STATUS_OK:
                return buf.raw[: length.value]
            if status == STATUS_INVALID_ARGUMENT and length.value > capacity:
                capacity = length.value
                continue
            self.check(status)
        raise RuntimeError("megamoe: the output of %s kept growing" % getattr(fn, "__name__", "a call"))


def raise_status(lib: "Library", status: int) -> None:
    message = lib.error_message() or ("megamoe: status %d" % status)
    if status == STATUS_INVALID_ARGUMENT:
        raise ValueError(message)
    raise RuntimeError(message)


_library: Optional[Library] = None
_lock = threading.Lock()


def get() -> Library:
    """The library, loaded on first use."""
    global _library
    lib = _library
    if lib is not None:
        return lib
    with _lock:
        if _library is None:
            _library = Library(find_library())
        return _library
