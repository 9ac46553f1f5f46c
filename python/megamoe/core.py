"""The torch-free part of megamoe: version, shape validation and the workspace table.

Nothing here touches CUDA: these functions work on a machine without a GPU (libmegamoe.so must be
built; see megamoe._lib for where it is looked up).
"""

import ctypes
import math
import operator
from pathlib import Path
from typing import Any

from . import _lib
from ._lib import LibraryNotFoundError  # noqa: F401  (re-exported)

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def library_path() -> Path:
    """The path of the libmegamoe.so in use (loads it)."""
    return _lib.get().path


def version() -> str:
    """The version of the loaded libmegamoe.so, e.g. '0.2.0'."""
    return _lib.get().version().decode("ascii")


def abi_version() -> int:
    """The C ABI version of the loaded libmegamoe.so (checked against these bindings on load)."""
    return int(_lib.get().abi_version())


def parse_weight_dtype(value: Any, name: str = "weight_dtype") -> int:
    """'bf16' | 'fp8' (also 'bfloat16', 'float8_e4m3fn' and the torch dtypes) -> the C format code."""
    text = str(value)
    if text.startswith("torch."):
        text = text[len("torch."):]
    if text in ("bf16", "bfloat16"):
        return _lib.FORMAT_BF16
    if text in ("fp8", "float8_e4m3fn", "e4m3"):
        return _lib.FORMAT_FP8
    raise ValueError("%s = %r: must be 'bf16' or 'fp8'" % (name, value))


def parse_forward_impl(value: Any, name: str = "impl") -> int:
    """How a layer's forward runs: None (MEGAMOE_IMPL from the environment, else 'staged'), 'staged'
    (one kernel per stage, the reference) or 'fused' (one persistent kernel) -> the C code."""
    if value is None:
        return _lib.IMPL_DEFAULT
    if value == "staged":
        return _lib.IMPL_STAGED
    if value == "fused":
        return _lib.IMPL_FUSED
    raise ValueError("%s = %r: must be None, 'staged' or 'fused'" % (name, value))


def as_int64(value: Any, name: str) -> int:
    """An integer argument (int, numpy or torch integer scalar), or ValueError naming it."""
    if isinstance(value, bool):
        raise ValueError("%s = %r: must be an integer" % (name, value))
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError("%s = %r: must be an integer" % (name, value)) from None
    if not _INT64_MIN <= result <= _INT64_MAX:
        raise ValueError("%s = %d: out of the int64 range" % (name, result))
    return result


def as_float(value: Any, name: str) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError("%s = %r: must be a number" % (name, value)) from None
    return result


def _shape_args(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_dtype, swiglu_limit):
    limit = as_float(swiglu_limit, "swiglu_limit")
    if not math.isfinite(limit):
        # float -> C float would keep inf/nan, but say it here in the library's words anyway.
        raise ValueError("swiglu_limit = %r: must be finite and >= 0" % (limit,))
    return (
        as_int64(hidden, "hidden"),
        as_int64(intermediate, "intermediate"),
        as_int64(num_experts, "num_experts"),
        as_int64(top_k, "top_k"),
        as_int64(ep_size, "ep_size"),
        as_int64(max_tokens_per_rank, "max_tokens_per_rank"),
        parse_weight_dtype(weight_dtype),
        limit,
    )


def preset(name: str) -> dict:
    """A named preset's dimensions as the library defines them ("dsv3", "dsv4-flash", "dsv4-pro",
    "tiny"): hidden, intermediate, num_experts, top_k, swiglu_limit. ValueError for another name."""
    if not isinstance(name, str):
        raise ValueError("preset = %r: must be a string" % (name,))
    lib = _lib.get()
    dims = [ctypes.c_int64() for _ in range(4)]
    limit = ctypes.c_float()
    lib.check(lib.preset(name.encode("utf-8"), *[ctypes.byref(d) for d in dims], ctypes.byref(limit)))
    hidden, intermediate, num_experts, top_k = (d.value for d in dims)
    return {"hidden": hidden, "intermediate": intermediate, "num_experts": num_experts, "top_k": top_k,
            "swiglu_limit": limit.value}


def validate_shape(*, hidden, intermediate, num_experts, top_k, max_tokens_per_rank, ep_size=1,
                   weight_dtype="bf16", swiglu_limit=0.0) -> None:
    """Checks a layer shape without a GPU. Raises ValueError naming the first bad field and its rule,
    e.g. "hidden = 100: must be a positive multiple of 128"."""
    lib = _lib.get()
    args = _shape_args(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_dtype,
                       swiglu_limit)
    lib.check(lib.shape_validate(*args))


def workspace_table(*, hidden, intermediate, num_experts, top_k, max_tokens_per_rank, ep_size=1,
                    weight_dtype="bf16", swiglu_limit=0.0, pool_rows=0) -> str:
    """The workspace of one rank for a shape, as `megamoe info` prints it (region, arena, type,
    elements, alignment, offset, bytes, zeroed per forward; then the arena totals). pool_rows: the
    token pool's rows (0 or at least every pair of every rank: the worst case; a multiple of 256 below
    that: a windowed pool of MoE(impl='fused'), whose default is compact_pool_rows(...))."""
    lib = _lib.get()
    args = _shape_args(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_dtype,
                       swiglu_limit)
    return lib.read_string(lib.workspace_table, *args, as_int64(pool_rows, "pool_rows")).decode("utf-8", "replace")


def compact_pool_rows(*, hidden, intermediate, num_experts, top_k, max_tokens_per_rank, ep_size=1,
                      weight_dtype="bf16", swiglu_limit=0.0) -> int:
    """The token pool MoE(impl='fused') takes by default (unless MEGAMOE_POOL_ROWS sets another): one
    window under uniform routing (1.25 x a rank's uniform share plus 256 rows per local expert), or 0
    when no such pool is smaller than the worst case (every pair of every rank)."""
    lib = _lib.get()
    args = _shape_args(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_dtype,
                       swiglu_limit)
    rows = ctypes.c_int64()
    lib.check(lib.compact_pool_rows(*args, ctypes.byref(rows)))
    return rows.value


def largest_pool_rows_within(*, hidden, intermediate, num_experts, top_k, max_tokens_per_rank, max_bytes,
                             ep_size=1, weight_dtype="bf16", swiglu_limit=0.0) -> int:
    """The largest token pool whose workspace per rank fits in max_bytes (for MoE(pool_rows=...) when
    the layer gets a memory budget): the worst case (every pair of every rank) when that fits, else a
    multiple of 256 below it, a windowed pool for MoE(impl='fused'), else 0 (no pool fits)."""
    lib = _lib.get()
    args = _shape_args(hidden, intermediate, num_experts, top_k, ep_size, max_tokens_per_rank, weight_dtype,
                       swiglu_limit)
    budget = as_int64(max_bytes, "max_bytes")
    if budget < 0:
        raise ValueError("max_bytes = %d: must be >= 0" % budget)
    rows = ctypes.c_int64()
    lib.check(lib.largest_pool_rows_within(*args, ctypes.c_uint64(budget), ctypes.byref(rows)))
    return rows.value
