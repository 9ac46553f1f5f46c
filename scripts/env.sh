# Sourced by the scripts that run megamoe programs: the environment every run needs.
#
# - NVLink multicast stays off (a program that uses it can put a shared host's GPUs out of service).
# - NCCL at run time must be the version megamoe was compiled against (2.28.9: its device API has no
#   compatibility across versions). Where PyTorch's pip NCCL of that version is installed (our GPU
#   machines: /opt/torch/.venv), it goes first in LD_LIBRARY_PATH; MEGAMOE_NCCL_LIB_DIR names another.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -z "${MEGAMOE_NCCL_LIB_DIR:-}" ] && command -v python3 >/dev/null; then
  MEGAMOE_NCCL_LIB_DIR=$(python3 - 2>/dev/null <<'PY'
import importlib.metadata as m, os
try:
    if m.version("nvidia-nccl-cu13") == "2.28.9":
        import nvidia.nccl
        print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))
except Exception:
    pass
PY
)
fi
if [ -n "${MEGAMOE_NCCL_LIB_DIR:-}" ] && [ -f "$MEGAMOE_NCCL_LIB_DIR/libnccl.so.2" ]; then
  export LD_LIBRARY_PATH="$MEGAMOE_NCCL_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
