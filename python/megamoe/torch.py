"""PyTorch binding: the layer (MoE) and the operator torch.ops.megamoe.forward.

    from megamoe.torch import MoE
    moe = MoE(group, num_experts=256, hidden=7168, intermediate=2048, top_k=8, max_tokens_per_rank=4096)
    moe.load_weights(w13, w2, w13_scale, w2_scale)   # this rank's experts, checkpoint layout
    y = moe.forward(x, topk_ids, topk_weights, routed_scaling_factor=2.5)

The op receives the layer as an integer handle, so torch.compile never traces into the MoE object, and
one forward is one opaque op (no graph break under fullgraph=True). The op enqueues the layer on the
current CUDA stream without host synchronisation, so it can be captured in a CUDA graph.

Only this module imports torch; it works with any PyTorch 2.x (torch.library.custom_op from 2.4,
the older torch.library.Library registration before that).
"""

import ctypes
import math
import sys
import threading
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _lib
from .core import as_float, as_int64, parse_forward_impl, parse_weight_dtype, validate_shape

__all__ = ["MoE", "quantize_weights_fp8"]

_BF16 = torch.bfloat16
_FP32 = torch.float32
_INT32 = torch.int32
_INT64 = torch.int64
_FP8 = getattr(torch, "float8_e4m3fn", None)  # torch >= 2.1

# Live layers by handle: the op looks its layer up here (an unknown handle is a ValueError rather
# than a crash), and finds the precomputed checks and the ctypes function.
_LAYERS: Dict[int, "_LayerState"] = {}
# Layers dropped while a CUDA graph was being captured (destroying synchronises the device, which
# would break the capture): destroyed by the next MoE created or closed outside a capture.
_DEFERRED: List[Tuple[int, int]] = []
_DEFERRED_LOCK = threading.Lock()


def _describe(t: torch.Tensor) -> str:
    return "%s %s on %s" % (list(t.shape), str(t.dtype).replace("torch.", ""), t.device)


def _require_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError("%s: must be a torch.Tensor, got %s" % (name, type(t).__name__))


class _LayerState:
    """What the op needs per call, computed once: shape, device, ctypes function."""

    __slots__ = ("handle", "hidden", "top_k", "max_tokens", "scale_cols", "fp8", "device", "device_index",
                 "weights_loaded", "forward_fn", "lib")

    def __init__(self, handle: int, hidden: int, top_k: int, max_tokens: int, fp8: bool, device_index: int,
                 lib: "_lib.Library"):
        self.handle = handle
        self.hidden = hidden
        self.top_k = top_k
        self.max_tokens = max_tokens
        self.scale_cols = hidden // 128
        self.fp8 = fp8
        self.device_index = device_index
        self.device = torch.device("cuda", device_index)
        self.weights_loaded = False
        self.forward_fn = lib.layer_forward
        self.lib = lib

    def _check_2d(self, t, name: str, rows: int, cols: int, cols_name: str) -> None:
        if t.device != self.device:
            raise ValueError("%s: is on %s, the layer is on %s" % (name, t.device, self.device))
        if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != cols:
            raise ValueError("%s: shape %s, expected [%d, %s = %d]" % (name, list(t.shape), rows, cols_name, cols))
        if not t.is_contiguous():
            raise ValueError("%s: must be contiguous (row-major), got strides %s" % (name, list(t.stride())))

    def run(self, x, x_scale, topk_ids, topk_weights, routed_scaling_factor, num_tokens_device):
        if not self.weights_loaded:
            raise ValueError("weights: not loaded; call MoE.load_weights(...) on every rank before forward")
        hidden = self.hidden
        # ---- x (and x_scale)
        _require_tensor(x, "x")
        if x.device != self.device:
            raise ValueError("x: is on %s, the layer is on %s" % (x.device, self.device))
        if x.dim() != 2 or x.shape[1] != hidden:
            raise ValueError("x: shape %s, expected [num_tokens, hidden = %d]" % (list(x.shape), hidden))
        tokens = x.shape[0]
        if tokens > self.max_tokens:
            raise ValueError("x: %d tokens (rows) > max_tokens_per_rank = %d" % (tokens, self.max_tokens))
        if not x.is_contiguous():
            raise ValueError("x: must be contiguous (row-major), got strides %s" % (list(x.stride()),))
        x_dtype = x.dtype
        if x_dtype == _BF16:
            if x_scale is not None:
                raise ValueError("x_scale: must be None when x is bf16 (it is for pre-quantised fp8 x)")
            x_scale_ptr = None
        elif _FP8 is not None and x_dtype == _FP8:
            if not self.fp8:
                raise ValueError("x: fp8 activations need a layer created with weight_dtype='fp8'")
            if x_scale is None:
                raise ValueError("x_scale: fp8 x needs its fp32 scales [num_tokens, hidden/128]")
            _require_tensor(x_scale, "x_scale")
            if x_scale.dtype != _FP32:
                raise ValueError("x_scale: dtype %s, must be torch.float32" % (x_scale.dtype,))
            self._check_2d(x_scale, "x_scale", tokens, self.scale_cols, "hidden/128")
            x_scale_ptr = x_scale.data_ptr()
        else:
            raise ValueError("x: dtype %s, must be torch.bfloat16 (or torch.float8_e4m3fn with x_scale on an fp8 "
                             "layer)" % (x_dtype,))
        # ---- routing
        _require_tensor(topk_ids, "topk_ids")
        ids_dtype = topk_ids.dtype
        if ids_dtype == _INT32:
            ids_int64 = 0
        elif ids_dtype == _INT64:
            ids_int64 = 1
        else:
            raise ValueError("topk_ids: dtype %s, must be torch.int32 or torch.int64" % (ids_dtype,))
        self._check_2d(topk_ids, "topk_ids", tokens, self.top_k, "top_k")
        _require_tensor(topk_weights, "topk_weights")
        if topk_weights.dtype != _FP32:
            raise ValueError("topk_weights: dtype %s, must be torch.float32" % (topk_weights.dtype,))
        self._check_2d(topk_weights, "topk_weights", tokens, self.top_k, "top_k")
        if not math.isfinite(routed_scaling_factor):
            raise ValueError("routed_scaling_factor = %r: must be finite" % (routed_scaling_factor,))
        # ---- the token count on the device
        if num_tokens_device is None:
            count_ptr = None
        else:
            _require_tensor(num_tokens_device, "num_tokens_device")
            if num_tokens_device.dtype != _INT32:
                raise ValueError("num_tokens_device: dtype %s, must be torch.int32" % (num_tokens_device.dtype,))
            if num_tokens_device.device != self.device:
                raise ValueError("num_tokens_device: is on %s, the layer is on %s"
                                 % (num_tokens_device.device, self.device))
            if num_tokens_device.numel() != 1:
                raise ValueError("num_tokens_device: shape %s, must hold one int32 ([1])"
                                 % (list(num_tokens_device.shape),))
            if tokens != self.max_tokens:
                raise ValueError("x: %d rows; with num_tokens_device every tensor must hold max_tokens_per_rank = %d "
                                 "rows (the count is read on the device)" % (tokens, self.max_tokens))
            count_ptr = num_tokens_device.data_ptr()

        y = torch.empty((tokens, hidden), dtype=_BF16, device=self.device)
        stream = torch.cuda.current_stream(self.device_index).cuda_stream
        status = self.forward_fn(self.handle, x.data_ptr(), x_scale_ptr, topk_ids.data_ptr(), ids_int64,
                                 topk_weights.data_ptr(), y.data_ptr(), routed_scaling_factor, tokens, count_ptr,
                                 stream)
        if status:
            _lib.raise_status(self.lib, status)
        return y


# ---------------------------------------------------------------------------------------------------
# The operator


def _forward_impl(layer: int, x: torch.Tensor, x_scale: Optional[torch.Tensor], topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, routed_scaling_factor: float,
                  num_tokens_device: Optional[torch.Tensor]) -> torch.Tensor:
    state = _LAYERS.get(layer)
    if state is None:
        raise ValueError("layer: %r is not the handle of a live megamoe layer (closed, or never created)" % (layer,))
    return state.run(x, x_scale, topk_ids, topk_weights, routed_scaling_factor, num_tokens_device)


def _forward_fake(layer, x, x_scale, topk_ids, topk_weights, routed_scaling_factor, num_tokens_device):
    # y is bf16 whatever x is (fp8 x included), one row per row of x.
    return x.new_empty((x.shape[0], x.shape[1]), dtype=_BF16)


_SCHEMA = ("(int layer, Tensor x, Tensor? x_scale, Tensor topk_ids, Tensor topk_weights, "
           "float routed_scaling_factor, Tensor? num_tokens_device) -> Tensor")
_legacy_library = None  # keeps a pre-2.4 registration alive


def _register_op():
    global _legacy_library
    namespace = torch.ops.megamoe
    if hasattr(namespace, "forward"):  # registered by an earlier import of this module
        return namespace.forward.default
    if hasattr(torch.library, "custom_op"):  # torch >= 2.4
        op = torch.library.custom_op("megamoe::forward", mutates_args=())(_forward_impl)
        op.register_fake(_forward_fake)
    else:
        _legacy_library = torch.library.Library("megamoe", "FRAGMENT")
        _legacy_library.define("forward" + _SCHEMA)
        _legacy_library.impl("forward", _forward_impl, "CompositeExplicitAutograd")
        if hasattr(torch.library, "impl_abstract"):  # torch 2.2, 2.3: torch.compile support
            torch.library.impl_abstract("megamoe::forward", lib=_legacy_library)(_forward_fake)
    return torch.ops.megamoe.forward.default


_OP = _register_op()


# ---------------------------------------------------------------------------------------------------
# The layer


def _destroy(lib: "_lib.Library", layer: int, comm: int) -> None:
    status = lib.layer_destroy(layer) if layer else 0
    comm_status = lib.comm_destroy(comm) if comm else 0
    lib.check(status or comm_status)


def _destroy_deferred() -> None:
    with _DEFERRED_LOCK:
        pending = list(_DEFERRED)
        del _DEFERRED[:]
    if not pending:
        return
    lib = _lib.get()
    for layer, comm in pending:
        _destroy(lib, layer, comm)


def _process_group_rank(group) -> Tuple[int, int, int]:
    """(rank in group, group size, global rank of the group's rank 0)."""
    initialised = dist.is_available() and dist.is_initialized()
    if group is None:
        if not initialised:
            return 0, 1, 0
        return dist.get_rank(), dist.get_world_size(), 0
    if not initialised:
        raise ValueError("group: a process group was given but torch.distributed is not initialised")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    world = dist.get_world_size(group)
    get_global_rank = getattr(dist, "get_global_rank", None)
    if get_global_rank is None:  # torch < 2.0 spelled it privately
        from torch.distributed import distributed_c10d
        get_global_rank = distributed_c10d._get_global_rank
    return rank, world, get_global_rank(group, 0)


class MoE:
    """The expert-parallel MoE layer on this rank's GPU (torch.cuda.current_device()).

    Collective: every rank of `group` (a torch.distributed process group; None: the default group,
    or, without an initialised process group, this process alone) creates it with the same
    arguments, at the same point, outside any CUDA graph capture. Rank r of the group owns experts
    [r * E/W, (r + 1) * E/W). With one rank the layer needs no NCCL; with several, NCCL symmetric
    memory over NVLink (the NCCL unique id is broadcast over `group`).

    weight_dtype: 'fp8' (e4m3 weights with DeepSeek's 128x128 block scales, activations quantised
    per token and 128 columns on the device) or 'bf16'. swiglu_limit > 0: gate <= limit and
    |up| <= limit before SwiGLU (DeepSeek-V4). num_sms: SMs one forward may occupy (None: all).
    impl: None (MEGAMOE_IMPL from the environment, else 'staged'), 'staged' (one kernel per stage,
    the reference) or 'fused' (the whole forward in one persistent kernel). pool_rows: rows of the
    token pool: 0, the forward's default ('staged': every pair of every rank, the all-to-one worst
    case; 'fused': MEGAMOE_POOL_ROWS, else compact_pool_rows(...), one window under uniform routing);
    at least that worst case; or, with 'fused', a multiple of 256 below it (FC1 and FC2 in windows of
    that many rows: less memory, one more pass over the weights per extra window).
    The attributes `impl` and `pool_rows` say what the layer resolved them to.

    Destroy with close() (collective too: every rank in the same order, no CUDA graph that uses the
    layer may be replayed afterwards); dropping the last reference closes it as well.
    """

    def __init__(self, group, num_experts: int, hidden: int, intermediate: int, top_k: int,
                 max_tokens_per_rank: int, weight_dtype="fp8", swiglu_limit: float = 0.0,
                 num_sms: Optional[int] = None, impl: Optional[str] = None, pool_rows: int = 0):
        self._handle = 0
        self._comm = 0
        self._state: Optional[_LayerState] = None
        if not torch.cuda.is_available():
            raise RuntimeError("megamoe.torch.MoE needs a CUDA GPU (torch.cuda.is_available() is False)")
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("megamoe.torch.MoE: create the layer outside CUDA graph capture (it allocates its "
                               "workspace and, with several ranks, communicates)")
        fmt = parse_weight_dtype(weight_dtype)
        num_experts = as_int64(num_experts, "num_experts")
        hidden = as_int64(hidden, "hidden")
        intermediate = as_int64(intermediate, "intermediate")
        top_k = as_int64(top_k, "top_k")
        max_tokens_per_rank = as_int64(max_tokens_per_rank, "max_tokens_per_rank")
        swiglu_limit = as_float(swiglu_limit, "swiglu_limit")
        sms = 0 if num_sms is None else as_int64(num_sms, "num_sms")
        if sms < 0:
            raise ValueError("num_sms = %d: must be >= 1, or None for every SM" % sms)
        impl_code = parse_forward_impl(impl)
        pool_rows = as_int64(pool_rows, "pool_rows")
        if pool_rows < 0:
            raise ValueError("pool_rows = %d: must be >= 0 (0: the forward's default)" % pool_rows)

        weight_name = "fp8" if fmt == _lib.FORMAT_FP8 else "bf16"

        rank, world, src = _process_group_rank(group)
        # Every rank checks the same shape and fails the same way, before any collective.
        validate_shape(hidden=hidden, intermediate=intermediate, num_experts=num_experts, top_k=top_k,
                       max_tokens_per_rank=max_tokens_per_rank, ep_size=world, weight_dtype=weight_name,
                       swiglu_limit=swiglu_limit)
        device = torch.cuda.current_device()  # also initialises torch's CUDA context first
        self.num_experts = num_experts
        self.hidden = hidden
        self.intermediate = intermediate
        self.top_k = top_k
        self.max_tokens_per_rank = max_tokens_per_rank
        self.weight_dtype = weight_name
        self.swiglu_limit = swiglu_limit
        self.rank = rank
        self.world_size = world
        self.experts_per_rank = num_experts // world
        self.first_expert = rank * self.experts_per_rank
        self.device = torch.device("cuda", device)
        self.num_sms = 0
        self.impl = None
        self.pool_rows = 0
        lib = _lib.get()
        self._lib = lib
        _destroy_deferred()

        comm = ctypes.c_void_p()
        if world == 1:
            lib.check(lib.comm_create_local(device, ctypes.byref(comm)))
        else:
            unique_id = self._broadcast_unique_id(lib, group, rank, src)
            lib.check(lib.comm_create_nccl(rank, world, device, unique_id, len(unique_id), ctypes.byref(comm)))
        self._comm = comm.value or 0
        layer = ctypes.c_void_p()
        status = lib.layer_create(self._comm, hidden, intermediate, num_experts, top_k, max_tokens_per_rank, fmt,
                                  swiglu_limit, sms, impl_code, pool_rows, ctypes.byref(layer))
        if status:
            message = lib.error_message()
            lib.comm_destroy(self._comm)
            self._comm = 0
            raise (ValueError if status == _lib.STATUS_INVALID_ARGUMENT else RuntimeError)(message)
        self._handle = layer.value or 0
        info_rank, info_sms, info_impl, info_pool_rows = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int64()
        lib.check(lib.layer_info(self._handle, ctypes.byref(info_rank), ctypes.byref(info_sms), ctypes.byref(info_impl),
                                 ctypes.byref(info_pool_rows)))

        self.num_sms = info_sms.value  # the SM budget in effect
        self.impl = "fused" if info_impl.value == _lib.IMPL_FUSED else "staged"
        self.pool_rows = info_pool_rows.value
        self._loaded = [False] * self.experts_per_rank
        self._state = _LayerState(self._handle, hidden, top_k, max_tokens_per_rank, fmt == _lib.FORMAT_FP8, device,
                                  lib)
        _LAYERS[self._handle] = self._state

    @staticmethod
    def _broadcast_unique_id(lib, group, rank: int, src: int) -> bytes:
        # Rank 0 sends the id, or its error, so that no rank waits forever on a failed rank 0.
        payload = [None]
        if rank == 0:
            try:
                payload[0] = ("ok", lib.read_string(lib.nccl_unique_id))
            except Exception as e:  # noqa: BLE001 - forwarded to every rank below
                payload[0] = ("error", "%s: %s" % (type(e).__name__, e))
        dist.broadcast_object_list(payload, src=src, group=group)
        kind, value = payload[0]
        if kind != "ok":
            raise RuntimeError("megamoe: rank 0 of the group could not make an NCCL unique id: %s" % value)
        return value

    # -- properties and helpers

    @property
    def handle(self) -> int:
        """The layer handle the op takes (0 once closed)."""
        return self._handle

    @property
    def weights_loaded(self) -> bool:
        return self._state is not None and self._state.weights_loaded

    def workspace_table(self) -> str:
        """This layer's workspace table (regions, arenas, byte sizes)."""
        self._require_open()
        return self._lib.read_string(self._lib.layer_workspace_table, self._handle).decode("utf-8", "replace")

    def __repr__(self) -> str:
        if not hasattr(self, "num_sms"):
            return "MoE(<not created>)"
        return ("MoE(H=%d, I=%d, E=%d, K=%d, ep=%d, rank=%d, max_tokens_per_rank=%d, %s, swiglu_limit=%g, "
                "num_sms=%d, impl=%s, pool_rows=%d, %s)" % (
                    self.hidden, self.intermediate, self.num_experts, self.top_k, self.world_size, self.rank,
                    self.max_tokens_per_rank, self.weight_dtype, self.swiglu_limit, self.num_sms, self.impl,
                    self.pool_rows, "open" if self._handle else "closed"))

    def _require_open(self) -> None:
        if not self._handle:
            raise ValueError("layer: this MoE has been closed")

    def _require_not_capturing(self, what: str) -> None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("megamoe: %s cannot run during CUDA graph capture" % what)

    # -- weights

    def load_weights(self, w13: torch.Tensor, w2: torch.Tensor, w13_scale: Optional[torch.Tensor] = None,
                     w2_scale: Optional[torch.Tensor] = None) -> None:
        """This rank's experts [first_expert, first_expert + experts_per_rank), checkpoint layout:
        w13 [E_local, 2I, H] (gate rows, then up rows), w2 [E_local, H, I]; either fp8
        (torch.float8_e4m3fn) with fp32 block scales w13_scale [E_local, 2I/128, H/128] and w2_scale
        [E_local, H/128, I/128], or bf16 without scales (quantised on the device by an fp8 layer).
        The weights are copied; the tensors may be freed once this returns."""
        self.load_expert_weights(0, w13, w2, w13_scale, w2_scale)

    def load_expert_weights(self, first: int, w13: torch.Tensor, w2: torch.Tensor,
                            w13_scale: Optional[torch.Tensor] = None, w2_scale: Optional[torch.Tensor] = None) -> None:
        """The same for local experts [first, first + w13.shape[0]) only (local indices), so a large
        checkpoint can be streamed in; forward needs every local expert loaded once."""
        self._require_open()
        self._require_not_capturing("load_weights")
        first = as_int64(first, "first")
        El, H, I = self.experts_per_rank, self.hidden, self.intermediate
        for name, t in (("w13", w13), ("w2", w2)):
            _require_tensor(t, name)
            if t.device != self.device:
                raise ValueError("%s: is on %s, the layer is on %s" % (name, t.device, self.device))
        if w13.dim() != 3:
            raise ValueError("w13: shape %s, expected [experts, 2*intermediate = %d, hidden = %d]"
                             % (list(w13.shape), 2 * I, H))
        count = w13.shape[0]
        if first < 0 or count < 1 or first + count > El:
            raise ValueError("w13: experts [%d, %d) of this rank, must be a non-empty range inside "
                             "[0, experts_per_rank = %d)" % (first, first + count, El))
        if tuple(w13.shape) != (count, 2 * I, H):
            raise ValueError("w13: shape %s, expected [%d, 2*intermediate = %d, hidden = %d]"
                             % (list(w13.shape), count, 2 * I, H))
        if tuple(w2.shape) != (count, H, I):
            raise ValueError("w2: shape %s, expected [%d, hidden = %d, intermediate = %d]"
                             % (list(w2.shape), count, H, I))
        if w13.dtype == _BF16:
            fmt = _lib.FORMAT_BF16
        elif _FP8 is not None and w13.dtype == _FP8:
            fmt = _lib.FORMAT_FP8
            if self.weight_dtype != "fp8":
                raise ValueError("w13: fp8 weights need a layer created with weight_dtype='fp8' (this one is bf16)")
        else:
            raise ValueError("w13: dtype %s, must be torch.bfloat16 or torch.float8_e4m3fn" % (w13.dtype,))
        if w2.dtype != w13.dtype:
            raise ValueError("w2: dtype %s, must match w13 (%s)" % (w2.dtype, w13.dtype))
        for name, t in (("w13", w13), ("w2", w2)):
            if not t.is_contiguous():
                raise ValueError("%s: must be contiguous" % name)
        scale_ptrs = [None, None]
        expected_scales = (("w13_scale", w13_scale, (count, 2 * I // 128, H // 128)),
                           ("w2_scale", w2_scale, (count, H // 128, I // 128)))
        for i, (name, t, shape) in enumerate(expected_scales):
            if fmt == _lib.FORMAT_BF16:
                if t is not None:
                    raise ValueError("%s: must be None for bf16 weights" % name)
                continue
            if t is None:
                raise ValueError("%s: fp8 weights need fp32 block scales %s" % (name, list(shape)))
            _require_tensor(t, name)
            if t.dtype != _FP32:
                raise ValueError("%s: dtype %s, must be torch.float32" % (name, t.dtype))
            if t.device != self.device:
                raise ValueError("%s: is on %s, the layer is on %s" % (name, t.device, self.device))
            if tuple(t.shape) != shape:
                raise ValueError("%s: shape %s, expected %s" % (name, list(t.shape), list(shape)))
            if not t.is_contiguous():
                raise ValueError("%s: must be contiguous" % name)
            scale_ptrs[i] = t.data_ptr()

        stream = torch.cuda.current_stream(self.device)
        lib = self._lib
        lib.check(lib.layer_load_expert_weights(self._handle, first, count, fmt, w13.data_ptr(), w2.data_ptr(),
                                                scale_ptrs[0], scale_ptrs[1], stream.cuda_stream))
        # The copy (or quantisation) reads the caller's tensors on `stream`: finish it before they can
        # be freed or overwritten from another stream.
        stream.synchronize()
        for e in range(first, first + count):
            self._loaded[e] = True
        self._state.weights_loaded = all(self._loaded)

    # -- forward

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                routed_scaling_factor: float = 1.0, x_scale: Optional[torch.Tensor] = None,
                num_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y [T, H] bf16 = routed_scaling_factor * sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]).

        x [T, H] bf16 (or, on an fp8 layer, e4m3 with x_scale [T, H/128] fp32), T <= max_tokens_per_rank;
        topk_ids [T, K] int32 or int64 (global expert ids, -1: no expert); topk_weights [T, K] fp32.
        num_tokens: None, or an int32 [1] tensor on the device holding T, read on the device: then
        every tensor holds max_tokens_per_rank rows, y's rows past T are unspecified, rows past T
        of the inputs are never read, and one captured CUDA graph serves every batch size. Every rank calls forward, also with T = 0.
        Expert ids outside [-1, E) are dropped and reported by check_errors()."""
        return _OP(self._handle, x, x_scale, topk_ids, topk_weights, float(routed_scaling_factor), num_tokens)

    __call__ = forward

    def check_errors(self) -> None:
        """Waits for the layer's work and raises RuntimeError with the first error the device recorded
        since the last check (a bad expert id: token, slot and id; a device-side token count out of
        range; a peer that never arrived). After CUDA graph replays, synchronise first."""
        self._require_open()
        self._require_not_capturing("check_errors")
        self._lib.check(self._lib.layer_check_errors(self._handle))

    def synchronize(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Waits for everything enqueued on `stream` (default: the current stream), CUDA graph replays
        included, then check_errors(). Unlike torch.cuda.synchronize() it does not block forever when
        this rank's layer is dead (a peer that never arrived, a stalled GEMM pipeline): it raises.
        After such an error a kernel of this rank may never finish, and anything that waits for the
        device (close(), torch.cuda.synchronize(), interpreter exit) would hang: leave with os._exit."""
        self._require_open()
        self._require_not_capturing("synchronize")
        stream = stream if stream is not None else torch.cuda.current_stream(self._state.device)
        self._lib.check(self._lib.layer_synchronize(self._handle, ctypes.c_void_p(stream.cuda_stream)))

    # -- lifetime

    def close(self) -> None:
        """Frees the layer (collective: every rank, in the same order). Idempotent."""
        handle, comm = self._handle, self._comm
        if not handle and not comm:
            return
        self._require_not_capturing("MoE.close")
        self._handle = self._comm = 0
        _LAYERS.pop(handle, None)
        _destroy(getattr(self, "_lib", None) or _lib.get(), handle, comm)
        _destroy_deferred()

    def __enter__(self) -> "MoE":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        handle, comm = getattr(self, "_handle", 0), getattr(self, "_comm", 0)
        if not handle and not comm:
            return
        if sys is None or sys.is_finalizing():
            return  # interpreter shutdown: the process exit releases everything
        try:
            if torch.cuda.is_current_stream_capturing():
                _LAYERS.pop(handle, None)
                self._handle = self._comm = 0
                with _DEFERRED_LOCK:
                    _DEFERRED.append((handle, comm))
                return
            self.close()
        except Exception:  # noqa: BLE001 - nothing can be raised from __del__
            pass


# ---------------------------------------------------------------------------------------------------
# Weights


def quantize_weights_fp8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bf16 weights [E, R, C] (or [R, C]; R, C multiples of 128) -> (e4m3 [E, R, C], fp32 scales
    [E, R/128, C/128]) in DeepSeek's checkpoint format (scale = amax / 448 of each 128x128 block),
    computed on w's GPU by the library, on the current stream."""
    if _FP8 is None:
        raise RuntimeError("megamoe: fp8 weights need torch >= 2.1 (torch.float8_e4m3fn)")
    _require_tensor(w, "w")
    if w.dtype != _BF16:
        raise ValueError("w: dtype %s, must be torch.bfloat16" % (w.dtype,))
    if not w.is_cuda:
        raise ValueError("w: must be on a CUDA device, got %s" % (w.device,))
    squeeze = w.dim() == 2
    if squeeze:
        w = w.unsqueeze(0)
    if w.dim() != 3 or w.shape[1] % 128 or w.shape[2] % 128 or w.shape[0] < 1:
        raise ValueError("w: shape %s, expected [experts, rows, cols] with rows and cols multiples of 128"
                         % (list(w.shape),))
    w = w.contiguous()
    E, R, C = w.shape
    q = torch.empty((E, R, C), dtype=_FP8, device=w.device)
    scale = torch.empty((E, R // 128, C // 128), dtype=_FP32, device=w.device)
    lib = _lib.get()
    with torch.cuda.device(w.device):
        stream = torch.cuda.current_stream(w.device).cuda_stream
        lib.check(lib.quantize_weights_fp8(w.data_ptr(), E, R, C, q.data_ptr(), scale.data_ptr(), stream))
    if squeeze:
        return q[0], scale[0]
    return q, scale

