"""GPU tests of megamoe.torch: world size 1, small shapes, against a plain PyTorch reference.

Error bounds (per token: ||y[t] - ref[t]|| / ||ref[t]||, tokens without any expert must be exactly 0):
- bf16 weights: 2e-2. The reference (megamoe.reference, fp64 GEMMs) mirrors the layer's rounding
  points (SwiGLU output and each expert's FC2 row rounded to bf16), so what is left is fp32
  accumulation order, a few bf16 rounding flips, and y's own bf16 rounding: ~3e-3. A wrong expert,
  weight, slot or scale gives errors of order 1.
- fp8 weights: 4e-2. The reference uses the same dequantised weights and rounds x and the SwiGLU
  output to e4m3 per 1x128 block as the layer does; an element whose pre-quantisation value differs
  slightly can round to the neighbouring e4m3 value (one e4m3 step is 6-12 % of that element), which
  leaves ~1-2e-2 per token.
Graph replays and torch.compile runs must be bit-identical to eager forwards on the same inputs.
"""

import os
import zlib

import pytest

from conftest import REQUIRE_GPU, load_library_or_skip


def _skip_or_fail(reason):
    if REQUIRE_GPU:
        pytest.fail("MEGAMOE_REQUIRE_GPU=1: " + reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import torch
except ImportError:
    torch = None
if torch is None:
    _skip_or_fail("PyTorch is not installed (the GPU tests need it)")
if not torch.cuda.is_available():
    _skip_or_fail("no CUDA GPU is visible")
if torch.cuda.get_device_capability()[0] != 9:
    _skip_or_fail("megamoe needs a Hopper GPU (sm_90); this is sm_%d%d" % torch.cuda.get_device_capability())
if getattr(torch, "float8_e4m3fn", None) is None:
    _skip_or_fail("PyTorch %s has no torch.float8_e4m3fn (needs >= 2.1)" % torch.__version__)

import megamoe.torch as mt  # noqa: E402
from megamoe import reference as ref  # noqa: E402
from megamoe.torch import MoE  # noqa: E402
from torch_helpers import ExpertWeights, capture, uniform  # noqa: E402

H, I, E, K, TMAX = 512, 256, 16, 4, 256
BOUND = {"bf16": 2e-2, "fp8": 4e-2}
DEV = torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session", autouse=True)
def _library():
    load_library_or_skip()


@pytest.fixture
def gen(request):
    """A generator seeded per test (different data in every test, reproducible; MEGAMOE_TEST_SEED varies it)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("MEGAMOE_TEST_SEED", "0"))
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return g


class LayerCache:
    """Layers are created once per configuration (creating one allocates its workspace)."""

    def __init__(self):
        self.layers = {}

    def get(self, weight_dtype="bf16", swiglu_limit=0.0):
        key = (weight_dtype, swiglu_limit)
        if key not in self.layers:
            self.layers[key] = MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX,
                                   weight_dtype=weight_dtype, swiglu_limit=swiglu_limit)
        return self.layers[key]

    def close(self):
        for layer in self.layers.values():
            layer.close()


@pytest.fixture(scope="session")
def layers():
    cache = LayerCache()
    yield cache
    torch.cuda.synchronize()
    cache.close()


class Weights(ExpertWeights):
    """All E experts' weights (torch_helpers.ExpertWeights) for this module's shape."""

    def __init__(self, gen, fp8):
        super().__init__(gen, fp8, E, H, I)


def routing(gen, tokens, ids_dtype=torch.int32, mask_fraction=0.0):
    scores = torch.rand((tokens, E), generator=gen, device=DEV)
    ids = scores.argsort(dim=1, descending=True)[:, :K]  # K distinct experts per token
    if mask_fraction > 0:
        ids = torch.where(torch.rand((tokens, K), generator=gen, device=DEV) < mask_fraction,
                          torch.full_like(ids, -1), ids)
    weights = torch.rand((tokens, K), generator=gen, device=DEV) + 0.05
    weights = weights / weights.sum(dim=1, keepdim=True)
    return ids.to(ids_dtype).contiguous(), weights.float().contiguous()


def reference(x, ids, w, weights, layer, scale=1.0, fp8_x=None):
    """The reference output for `layer`'s configuration; fp8_x = (q, s) when x was passed as fp8."""
    fp8 = layer.weight_dtype == "fp8"
    xr = ref.dequantize_blocks_fp8(*fp8_x) if fp8_x is not None else x
    return ref.moe_forward(xr, ids, w, weights.ref13, weights.ref2, swiglu_limit=layer.swiglu_limit,
                           routed_scaling_factor=scale, fp8_activations=fp8)


def assert_close_per_token(y, expected, bound, what=""):
    assert y.dtype == torch.bfloat16
    assert not torch.isnan(y).any(), "%s: NaN in y" % what
    err = ref.per_token_relative_error(y.float(), expected)
    worst = int(err.argmax()) if err.numel() else 0
    assert err.numel() == 0 or float(err.max()) <= bound, (
        "%s: worst token %d has relative error %.3g > %.3g (median %.3g)"
        % (what, worst, float(err.max()), bound, float(err.median())))


def sync_and_check(layer):
    torch.cuda.synchronize()
    layer.check_errors()


# ---------------------------------------------------------------------------------------------------
# correctness against the reference


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("tokens", [1, 37, TMAX])
def test_forward_matches_reference(layers, gen, weight_dtype, ids_dtype, tokens):
    layer = layers.get(weight_dtype)
    weights = Weights(gen, fp8=weight_dtype == "fp8")
    weights.load(layer)
    x = uniform(gen, (tokens, H))
    ids, w = routing(gen, tokens, ids_dtype)
    scale = 2.5 if tokens == 37 else 1.0
    y = layer.forward(x, ids, w, routed_scaling_factor=scale)
    assert y.shape == (tokens, H) and y.dtype == torch.bfloat16 and y.device == DEV
    sync_and_check(layer)
    assert_close_per_token(y, reference(x, ids, w, weights, layer, scale), BOUND[weight_dtype], weight_dtype)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
def test_swiglu_limit(layers, gen, weight_dtype):
    # A limit well inside the range of gate/up (|g| ~ 0.3 here), so the clamps are exercised.
    layer = layers.get(weight_dtype, swiglu_limit=0.25)
    weights = Weights(gen, fp8=weight_dtype == "fp8")
    weights.load(layer)
    x = uniform(gen, (100, H), 3.0)
    ids, w = routing(gen, 100)
    y = layer.forward(x, ids, w)
    sync_and_check(layer)
    assert_close_per_token(y, reference(x, ids, w, weights, layer), BOUND[weight_dtype], "swiglu_limit")
    unclamped = ref.moe_forward(x, ids, w, weights.ref13, weights.ref2, fp8_activations=weight_dtype == "fp8")
    assert float(ref.per_token_relative_error(y.float(), unclamped).median()) > 0.1, "the limit had no effect"


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_minus_one_ids(layers, gen, ids_dtype):
    layer = layers.get("bf16")
    weights = Weights(gen, fp8=False)
    weights.load(layer)
    tokens = 120
    x = uniform(gen, (tokens, H))
    ids, w = routing(gen, tokens, ids_dtype, mask_fraction=0.3)
    ids[5] = -1  # tokens without any expert: y must be exactly 0 there
    ids[77] = -1
    y = layer.forward(x, ids, w)
    sync_and_check(layer)
    assert torch.count_nonzero(y[5]) == 0 and torch.count_nonzero(y[77]) == 0
    assert_close_per_token(y, reference(x, ids, w, weights, layer), BOUND["bf16"], "-1 ids")


def test_fp8_layer_quantises_bf16_weights(layers, gen):
    layer = layers.get("fp8")
    weights = Weights(gen, fp8=True)
    weights.load(layer, as_bf16=True)  # the library quantises on the device, as ref.quantize_blocks_fp8 does
    x = uniform(gen, (64, H))
    ids, w = routing(gen, 64)
    y = layer.forward(x, ids, w)
    sync_and_check(layer)
    assert_close_per_token(y, reference(x, ids, w, weights, layer), BOUND["fp8"], "bf16 weights on an fp8 layer")


def test_fp8_activations(layers, gen):
    layer = layers.get("fp8")
    weights = Weights(gen, fp8=True)
    weights.load(layer)
    x = uniform(gen, (64, H))
    xq, xs = ref.quantize_blocks_fp8(x, 1, 128)
    ids, w = routing(gen, 64)
    y = layer.forward(xq, ids, w, x_scale=xs)
    assert y.dtype == torch.bfloat16
    sync_and_check(layer)
    assert_close_per_token(y, reference(x, ids, w, weights, layer, fp8_x=(xq, xs)), BOUND["fp8"], "fp8 x")


def test_quantize_weights_fp8_matches_torch(gen):
    w = uniform(gen, (3, 256, 384), 0.05)
    w[1, :128, :128] = 0  # an all-zero block: scale 1
    q, s = mt.quantize_weights_fp8(w)
    torch.cuda.synchronize()
    q_ref, s_ref = ref.quantize_blocks_fp8(w, 128, 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 2, 3)
    assert float(s[1, 0, 0]) == 1.0
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    a, b = ref.dequantize_blocks_fp8(q, s), ref.dequantize_blocks_fp8(q_ref, s_ref)
    # At most one e4m3 step apart (w / scale vs w * (1 / scale) may round differently), and rarely.
    # One step at e4m3 magnitude m is <= m / 8 for normal numbers and 2^-9 for subnormals.
    block_scale = s_ref.repeat_interleave(128, 1).repeat_interleave(128, 2)
    step = block_scale * torch.clamp(b.abs() / block_scale / 8, min=2.0 ** -9)
    assert bool(((a - b).abs() <= step * 1.001).all())
    assert float((a != b).float().mean()) < 1e-3


def test_zero_tokens(layers, gen):
    layer = layers.get("bf16")
    Weights(gen, fp8=False).load(layer)
    x = torch.empty((0, H), dtype=torch.bfloat16, device=DEV)
    ids = torch.empty((0, K), dtype=torch.int32, device=DEV)
    w = torch.empty((0, K), dtype=torch.float32, device=DEV)
    y = layer.forward(x, ids, w)
    assert y.shape == (0, H)
    sync_and_check(layer)


# ---------------------------------------------------------------------------------------------------
# CUDA graphs


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
def test_graph_replay_is_bit_identical(layers, gen, weight_dtype):
    layer = layers.get(weight_dtype)
    weights = Weights(gen, fp8=weight_dtype == "fp8")
    weights.load(layer)
    tokens = 96
    x = uniform(gen, (tokens, H))
    ids, w = routing(gen, tokens, torch.int64)
    graph, y_graph = capture(lambda: layer.forward(x, ids, w, routed_scaling_factor=1.25))
    for _ in range(2):  # new inputs in the same buffers, then replays
        x.copy_(uniform(gen, (tokens, H)))
        new_ids, new_w = routing(gen, tokens, torch.int64)
        ids.copy_(new_ids)
        w.copy_(new_w)
        graph.replay()
        torch.cuda.synchronize()
        y_eager = layer.forward(x, ids, w, routed_scaling_factor=1.25)
        sync_and_check(layer)
        assert torch.equal(y_graph, y_eager), "graph replay differs from the eager forward"
        assert_close_per_token(y_graph, reference(x, ids, w, weights, layer, 1.25), BOUND[weight_dtype], "graph")
    del graph


def test_synchronize_waits_for_graph_replays_and_reports(layers, gen):
    """MoE.synchronize() covers replays on the current stream (check_errors() alone covers eager
    forwards): a bad id written into the captured buffers is reported after the replay."""
    layer = layers.get("bf16")
    weights = Weights(gen, fp8=False)
    weights.load(layer)
    tokens = 40
    x = uniform(gen, (tokens, H))
    ids, w = routing(gen, tokens)
    graph, y = capture(lambda: layer.forward(x, ids, w))
    layer.synchronize()
    ids[7, 0] = E + 3
    graph.replay()
    with pytest.raises(RuntimeError, match=r"topk_ids\[7, 0\] = %d" % (E + 3)):
        layer.synchronize()
    ids[7, 0] = -1
    graph.replay()
    layer.synchronize()
    assert_close_per_token(y, reference(x, ids, w, weights, layer), BOUND["bf16"], "after synchronize")
    del graph


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_graph_with_device_token_count(layers, gen, ids_dtype):
    layer = layers.get("bf16")
    weights = Weights(gen, fp8=False)
    weights.load(layer)
    x = uniform(gen, (TMAX, H))
    ids, w = routing(gen, TMAX, ids_dtype)
    count = torch.zeros(1, dtype=torch.int32, device=DEV)
    graph, y = capture(lambda: layer.forward(x, ids, w, num_tokens=count))
    assert y.shape == (TMAX, H)
    for tokens in (0, 1, 100, TMAX, 7):
        x.copy_(uniform(gen, (TMAX, H)))
        new_ids, new_w = routing(gen, TMAX, ids_dtype)
        ids.copy_(new_ids)
        w.copy_(new_w)
        # rows past the count must never be read: poison them (an id out of range would be reported)
        x[tokens:] = float("nan")
        ids[tokens:] = 1 << 20
        w[tokens:] = float("nan")
        count.fill_(tokens)
        graph.replay()
        sync_and_check(layer)  # no bad id reported: the poisoned rows were not read
        expected = reference(x[:tokens], ids[:tokens], w[:tokens], weights, layer)
        assert_close_per_token(y[:tokens], expected, BOUND["bf16"], "device count %d" % tokens)
    del graph


def test_device_token_count_out_of_range(layers, gen):
    layer = layers.get("bf16")
    Weights(gen, fp8=False).load(layer)
    x = uniform(gen, (TMAX, H))
    ids, w = routing(gen, TMAX)
    for bad in (TMAX + 1, -1):
        count = torch.full((1,), bad, dtype=torch.int32, device=DEV)
        layer.forward(x, ids, w, num_tokens=count)
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError):
            layer.check_errors()
    layer.check_errors()  # cleared: the layer keeps working
    y = layer.forward(x[:10], ids[:10], w[:10])
    sync_and_check(layer)
    assert not torch.isnan(y).any()


# ---------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(layers, gen, backend):
    layer = layers.get("bf16")
    weights = Weights(gen, fp8=False)
    weights.load(layer)
    torch._dynamo.reset()

    def block(x, ids, w):
        h = (x.float() * 0.5).to(torch.bfloat16)  # exact: a power of two
        y = layer.forward(h, ids, w, routed_scaling_factor=2.0)
        return y.float() * 2.0

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    for tokens in (64, 17):
        x = uniform(gen, (tokens, H))
        ids, w = routing(gen, tokens, torch.int64)
        out = compiled(x, ids, w)
        expected = block(x, ids, w)
        sync_and_check(layer)
        assert torch.equal(out, expected), "torch.compile(%s) differs from eager" % backend
        half = (x.float() * 0.5).to(torch.bfloat16)
        assert_close_per_token((out / 2.0).bfloat16(), reference(half, ids, w, weights, layer, 2.0), BOUND["bf16"],
                               "compiled")
    torch._dynamo.reset()


def test_opcheck(layers, gen):
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs PyTorch >= 2.4")
    layer = layers.get("bf16")
    Weights(gen, fp8=False).load(layer)
    x = uniform(gen, (32, H))
    ids, w = routing(gen, 32)
    opcheck(torch.ops.megamoe.forward.default, (layer.handle, x, None, ids, w, 1.0, None))
    sync_and_check(layer)


# ---------------------------------------------------------------------------------------------------
# errors


def _valid_args(gen, tokens=16, ids_dtype=torch.int32):
    x = uniform(gen, (tokens, H))
    ids, w = routing(gen, tokens, ids_dtype)
    return dict(x=x, topk_ids=ids, topk_weights=w)


def _noncontiguous(t):
    return t.t().contiguous().t()  # same shape and values, column-major strides


BAD_FORWARD = {
    "x float32": ("x", lambda a: a.update(x=a["x"].float())),
    "x on cpu": ("x", lambda a: a.update(x=a["x"].cpu())),
    "x wrong hidden": ("x", lambda a: a.update(x=torch.zeros((16, H + 128), dtype=torch.bfloat16, device=DEV) + 1)),
    "x 3-d": ("x", lambda a: a.update(x=a["x"].unsqueeze(0))),
    "x 1-d": ("x", lambda a: a.update(x=a["x"][0])),
    "x non-contiguous": ("x", lambda a: a.update(x=_noncontiguous(a["x"]))),
    "x fp8 on a bf16 layer": ("x", lambda a: a.update(x=a["x"].to(torch.float8_e4m3fn),
                                                      x_scale=torch.ones((16, H // 128), device=DEV))),
    "x_scale with bf16 x": ("x_scale", lambda a: a.update(x_scale=torch.ones((16, H // 128), device=DEV))),
    "topk_ids float": ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"].float())),
    "topk_ids int16": ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"].to(torch.int16))),
    "topk_ids K+1": ("topk_ids", lambda a: a.update(topk_ids=torch.zeros((16, K + 1), dtype=torch.int32,
                                                                         device=DEV))),
    "topk_ids rows": ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"][:15].contiguous())),
    "topk_ids 1-d": ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"].flatten())),
    "topk_ids non-contiguous": ("topk_ids", lambda a: a.update(topk_ids=_noncontiguous(a["topk_ids"]))),
    "topk_ids on cpu": ("topk_ids", lambda a: a.update(topk_ids=a["topk_ids"].cpu())),
    "topk_weights bf16": ("topk_weights", lambda a: a.update(topk_weights=a["topk_weights"].bfloat16())),
    "topk_weights fp64": ("topk_weights", lambda a: a.update(topk_weights=a["topk_weights"].double())),
    "topk_weights K-1": ("topk_weights", lambda a: a.update(topk_weights=a["topk_weights"][:, :K - 1].contiguous())),
    "topk_weights non-contiguous": ("topk_weights",
                                    lambda a: a.update(topk_weights=_noncontiguous(a["topk_weights"]))),
    "topk_weights on cpu": ("topk_weights", lambda a: a.update(topk_weights=a["topk_weights"].cpu())),
    "num_tokens int64": ("num_tokens_device",
                         lambda a: a.update(num_tokens=torch.ones(1, dtype=torch.int64, device=DEV))),
    "num_tokens two": ("num_tokens_device",
                       lambda a: a.update(num_tokens=torch.ones(2, dtype=torch.int32, device=DEV))),
    "num_tokens on cpu": ("num_tokens_device", lambda a: a.update(num_tokens=torch.ones(1, dtype=torch.int32))),
    "num_tokens with T < max": ("x", lambda a: a.update(num_tokens=torch.ones(1, dtype=torch.int32, device=DEV))),
    "routed_scaling_factor nan": ("routed_scaling_factor", lambda a: a.update(routed_scaling_factor=float("nan"))),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARD))
def test_forward_bad_argument(layers, gen, case):
    layer = layers.get("bf16")
    Weights(gen, fp8=False).load(layer)
    name, mutate = BAD_FORWARD[case]
    args = _valid_args(gen)
    mutate(args)
    with pytest.raises(ValueError) as info:
        layer.forward(**args)
    assert str(info.value).split(":")[0].split(" ")[0] == name, str(info.value)


def test_forward_too_many_tokens(layers, gen):
    layer = layers.get("bf16")
    Weights(gen, fp8=False).load(layer)
    with pytest.raises(ValueError, match=r"^x: %d tokens \(rows\) > max_tokens_per_rank = %d" % (TMAX + 1, TMAX)):
        layer.forward(**_valid_args(gen, TMAX + 1))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_forward_other_gpu(layers, gen):
    layer = layers.get("bf16")
    Weights(gen, fp8=False).load(layer)
    other = torch.device("cuda", (DEV.index + 1) % torch.cuda.device_count())
    for name in ("x", "topk_ids", "topk_weights"):
        args = _valid_args(gen)
        args[name] = args[name].to(other)
        with pytest.raises(ValueError, match="^%s: is on cuda:%d" % (name, other.index)):
            layer.forward(**args)


def test_fp8_forward_bad_scales(layers, gen):
    layer = layers.get("fp8")
    Weights(gen, fp8=True).load(layer)
    args = _valid_args(gen)
    xq, xs = ref.quantize_blocks_fp8(args["x"], 1, 128)
    with pytest.raises(ValueError, match="^x_scale: fp8 x needs"):
        layer.forward(xq, args["topk_ids"], args["topk_weights"])
    with pytest.raises(ValueError, match="^x_scale: shape"):
        layer.forward(xq, args["topk_ids"], args["topk_weights"], x_scale=xs[:, :2].contiguous())
    with pytest.raises(ValueError, match="^x_scale: dtype"):
        layer.forward(xq, args["topk_ids"], args["topk_weights"], x_scale=xs.bfloat16())
    with pytest.raises(ValueError, match="^x: dtype"):
        layer.forward(args["x"].half(), args["topk_ids"], args["topk_weights"])


@pytest.mark.parametrize("bad_id, ids_dtype", [(E, torch.int32), (1000, torch.int32), (-2, torch.int32),
                                               (1 << 40, torch.int64), (E, torch.int64)])
def test_bad_expert_id_is_reported_and_dropped(layers, gen, bad_id, ids_dtype):
    layer = layers.get("bf16")
    weights = Weights(gen, fp8=False)
    weights.load(layer)
    tokens = 50
    x = uniform(gen, (tokens, H))
    ids, w = routing(gen, tokens, ids_dtype)
    ids[13, 2] = bad_id
    y = layer.forward(x, ids, w)  # no error at launch: ids are only read on the device
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError):
        layer.check_errors()
    layer.check_errors()  # reported once
    dropped = ids.clone()
    dropped[13, 2] = -1
    assert_close_per_token(y, reference(x, dropped, w, weights, layer), BOUND["bf16"], "bad id dropped")
    # the layer keeps working
    ids2, w2 = routing(gen, tokens, ids_dtype)
    y2 = layer.forward(x, ids2, w2)
    sync_and_check(layer)
    assert_close_per_token(y2, reference(x, ids2, w2, weights, layer), BOUND["bf16"], "after a bad id")


def test_weights_not_loaded(gen):
    with MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX,
             weight_dtype="bf16") as layer:
        assert not layer.weights_loaded
        with pytest.raises(ValueError, match="^weights: not loaded"):
            layer.forward(**_valid_args(gen))
        # streamed in two halves: loaded only once every local expert is
        weights = Weights(gen, fp8=False)
        layer.load_expert_weights(0, weights.w13[: E // 2], weights.w2[: E // 2])
        with pytest.raises(ValueError, match="^weights: not loaded"):
            layer.forward(**_valid_args(gen))
        layer.load_expert_weights(E // 2, weights.w13[E // 2:], weights.w2[E // 2:])
        assert layer.weights_loaded
        args = _valid_args(gen, 40)
        y = layer.forward(**args)
        sync_and_check(layer)
        assert_close_per_token(y, reference(args["x"], args["topk_ids"], args["topk_weights"], weights, layer),
                               BOUND["bf16"], "streamed weights")


def _bf16_weights(gen):
    return uniform(gen, (E, 2 * I, H), 0.05), uniform(gen, (E, H, I), 0.05)


BAD_WEIGHTS_BF16_LAYER = {
    "w13 shape": ("w13", lambda w13, w2: (w13[:, :I].contiguous(), w2, None, None)),
    "w13 2-d": ("w13", lambda w13, w2: (w13[0], w2, None, None)),
    "w13 too many experts": ("w13", lambda w13, w2: (torch.cat([w13, w13[:1]]), torch.cat([w2, w2[:1]]), None, None)),
    "w2 shape": ("w2", lambda w13, w2: (w13, w2.transpose(1, 2).contiguous(), None, None)),
    "w13 float32": ("w13", lambda w13, w2: (w13.float(), w2.float(), None, None)),
    "w2 dtype mismatch": ("w2", lambda w13, w2: (w13, w2.half(), None, None)),
    "w13 on cpu": ("w13", lambda w13, w2: (w13.cpu(), w2, None, None)),
    "w2 on cpu": ("w2", lambda w13, w2: (w13, w2.cpu(), None, None)),
    "w13 non-contiguous": ("w13", lambda w13, w2: (w13.transpose(1, 2).contiguous().transpose(1, 2), w2, None,
                                                   None)),
    "w13_scale with bf16": ("w13_scale", lambda w13, w2: (w13, w2, torch.ones((E, 2 * I // 128, H // 128),
                                                                              device=DEV), None)),
    "w13 fp8 on a bf16 layer": ("w13", lambda w13, w2: (w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn),
                                                        torch.ones((E, 2 * I // 128, H // 128), device=DEV),
                                                        torch.ones((E, H // 128, I // 128), device=DEV))),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS_BF16_LAYER))
def test_load_weights_bad_argument(layers, gen, case):
    layer = layers.get("bf16")
    name, make = BAD_WEIGHTS_BF16_LAYER[case]
    with pytest.raises(ValueError) as info:
        layer.load_weights(*make(*_bf16_weights(gen)))
    assert str(info.value).split(":")[0] == name, str(info.value)


def test_load_weights_bad_fp8_scales(layers, gen):
    layer = layers.get("fp8")
    weights = Weights(gen, fp8=True)
    q13, q2, s13, s2 = weights.q13, weights.q2, weights.s13, weights.s2
    cases = [
        ("w13_scale", (q13, q2, None, s2)),
        ("w2_scale", (q13, q2, s13, None)),
        ("w13_scale", (q13, q2, s13.bfloat16(), s2)),
        ("w2_scale", (q13, q2, s13, s2[:, :, :1].contiguous())),
        ("w13_scale", (q13, q2, s13.cpu(), s2)),
        ("w2", (q13, weights.w2, s13, s2)),
    ]
    for name, args in cases:
        with pytest.raises(ValueError) as info:
            layer.load_weights(*args)
        assert str(info.value).split(":")[0] == name, str(info.value)


def test_create_bad_shape_names_the_field():
    with pytest.raises(ValueError, match="^hidden = 500: "):
        MoE(None, num_experts=E, hidden=500, intermediate=I, top_k=K, max_tokens_per_rank=TMAX)
    with pytest.raises(ValueError, match="^top_k = 0: "):
        MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=0, max_tokens_per_rank=TMAX)
    with pytest.raises(ValueError, match="^weight_dtype = "):
        MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX, weight_dtype="int8")
    with pytest.raises(ValueError, match="^num_sms = "):
        MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX, num_sms=-1)


def test_create_bad_impl_or_pool_rows_names_the_argument():
    with pytest.raises(ValueError, match="^impl = 'one-kernel': "):
        MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX, impl="one-kernel")
    with pytest.raises(ValueError, match="^pool_rows = -256: "):
        MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX, pool_rows=-256)
    # The library's rules (layout.h: pool_rows_for), checked before anything is allocated and named as
    # the argument (pool_rows, not the C++ layer's options.pool_rows).
    with pytest.raises(ValueError, match=r"(?<![.\w])pool_rows = 100: must be 0 .* or a positive multiple of 256"):
        MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX, impl="fused",
            pool_rows=100)
    with pytest.raises(ValueError, match=r"(?<![.\w])pool_rows = 256: below the 1024 rows .* only the fused forward"):
        MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX, impl="staged",
            pool_rows=256)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
def test_fused_and_windowed_forwards_equal_staged(gen, weight_dtype, monkeypatch):
    # impl and pool_rows reach the layer: the fused forward, and the fused forward with a 256-row pool
    # (4 windows of this shape's 1024 worst-case rows), give the staged forward's outputs bit for bit,
    # eager and in a graph replay, under routing that sends rows to every expert and tokens without any.
    # pool_rows=0: the fused forward's default, compact_pool_rows, which is the worst case for this shape
    monkeypatch.delenv("MEGAMOE_POOL_ROWS", raising=False)
    configs = (("staged", 0), ("fused", 0), ("fused", 256))
    made = []
    try:
        for impl, rows in configs:
            made.append(MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX,
                            weight_dtype=weight_dtype, impl=impl, pool_rows=rows))
        assert [(layer.impl, layer.pool_rows) for layer in made] == [("staged", TMAX * K), ("fused", TMAX * K),
                                                                      ("fused", 256)]
        assert "impl=fused, pool_rows=256" in repr(made[2])
        weights = Weights(gen, fp8=weight_dtype == "fp8")
        for layer in made:
            weights.load(layer)
        x = uniform(gen, (TMAX, H))
        ids, w = routing(gen, TMAX, mask_fraction=0.1)
        ids[5] = -1  # a token without any expert (its output row must be exactly 0)
        outputs = []
        for layer in made:
            outputs.append(layer.forward(x, ids, w))
            sync_and_check(layer)
        assert_close_per_token(outputs[0], reference(x, ids, w, weights, made[0]), BOUND[weight_dtype], "staged")
        for (impl, rows), y in zip(configs[1:], outputs[1:]):
            assert torch.equal(y, outputs[0]), "%s, pool_rows %d: differs from the staged forward" % (impl, rows)
        graph, graph_y = capture(lambda: made[2].forward(x, ids, w))
        graph_y.fill_(float("nan"))  # the replay must write every element
        graph.replay()
        sync_and_check(made[2])
        assert torch.equal(graph_y, outputs[0]), "fused with windows, graph replay: differs from the staged forward"
    finally:
        torch.cuda.synchronize()
        for layer in made:
            layer.close()


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
def test_create_during_capture_raises():
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="outside CUDA graph capture"):
        with torch.cuda.graph(graph):
            MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX)
    torch.cuda.synchronize()


def test_closed_layer(gen):
    layer = MoE(None, num_experts=E, hidden=H, intermediate=I, top_k=K, max_tokens_per_rank=TMAX, weight_dtype="bf16",
                num_sms=8)
    assert layer.num_sms == 8
    assert "token_pool" in layer.workspace_table()
    handle = layer.handle
    Weights(gen, fp8=False).load(layer)
    layer.close()
    layer.close()  # idempotent
    args = _valid_args(gen)
    with pytest.raises(ValueError, match="^layer: "):
        layer.forward(**args)
    with pytest.raises(ValueError, match="^layer: "):
        torch.ops.megamoe.forward(handle, args["x"], None, args["topk_ids"], args["topk_weights"], 1.0, None)
    with pytest.raises(ValueError, match="^layer: "):
        layer.check_errors()
