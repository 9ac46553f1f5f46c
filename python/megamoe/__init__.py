"""megamoe: an expert-parallel Mixture-of-Experts layer for Hopper GPUs (DeepSeek-V3/V4 class).

    import megamoe                 # torch-free: version(), preset(), validate_shape(), workspace_table(),
                                   # compact_pool_rows(), largest_pool_rows_within()
    from megamoe.torch import MoE  # the PyTorch layer and the torch.ops.megamoe.forward op

The native library libmegamoe.so is loaded with ctypes on first use (see megamoe._lib for where it is
looked up: MEGAMOE_LIBRARY, then the installed package, then the checkout's build/lib).
"""

__version__ = "0.2.0"

from .core import (  # noqa: E402
    LibraryNotFoundError,
    abi_version,
    compact_pool_rows,
    largest_pool_rows_within,
    library_path,
    preset,
    validate_shape,
    version,
    workspace_table,
)

__all__ = [
    "LibraryNotFoundError",
    "__version__",
    "abi_version",
    "compact_pool_rows",
    "largest_pool_rows_within",
    "library_path",
    "preset",
    "validate_shape",
    "version",
    "workspace_table",
]
