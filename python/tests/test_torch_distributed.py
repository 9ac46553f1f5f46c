"""The PyTorch layer across processes: every rank of a torchrun job joins the process group's layer.

    torchrun --nproc_per_node 2 -m pytest -q python/tests/test_torch_distributed.py

(one GPU per rank; scripts/gpu-check.sh runs it as the `python-dist` step). Each rank builds the same
full set of expert weights from a shared seed and loads its own slice; its tokens (a different count
per rank, 0 included) are routed to every rank's experts, and its output is checked token by token
against the plain PyTorch reference over all experts. Every test is collective: all ranks run the
same tests in the same order. Outside torchrun (WORLD_SIZE < 2) the module reports itself skipped.
"""

import os
import zlib

import pytest

from conftest import REQUIRE_GPU, load_library_or_skip

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
if WORLD < 2:
    pytest.skip("needs torchrun with 2 or more ranks (torchrun --nproc_per_node N -m pytest %s)" % __file__,
                allow_module_level=True)

try:
    import torch
    import torch.distributed as dist
except ImportError:
    if REQUIRE_GPU:
        pytest.fail("PyTorch is required here (MEGAMOE_REQUIRE_GPU=1)", pytrace=False)
    pytest.skip("PyTorch is not installed", allow_module_level=True)

from megamoe import reference as ref  # noqa: E402
from megamoe.torch import MoE  # noqa: E402
from torch_helpers import ExpertWeights, capture, uniform  # noqa: E402

LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
torch.cuda.set_device(LOCAL_RANK)
DEV = torch.device("cuda", LOCAL_RANK)
if not dist.is_initialized():
    dist.init_process_group("nccl", device_id=DEV)
RANK = dist.get_rank()

H, I, K, TMAX = 512, 256, 4, 256
E = 8 * WORLD  # 8 experts per rank
BOUND = {"bf16": 2e-2, "fp8": 4e-2}  # per token, as in test_torch.py


@pytest.fixture(scope="session", autouse=True)
def _library():
    load_library_or_skip()


def seed_of(request, per_rank):
    """Per test (and per rank when per_rank): reproducible, varied by MEGAMOE_TEST_SEED."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("MEGAMOE_TEST_SEED", "0"))
    return seed * 1000003 + (RANK + 1 if per_rank else 0)


@pytest.fixture
def shared_gen(request):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed_of(request, per_rank=False))
    return g


@pytest.fixture
def rank_gen(request):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed_of(request, per_rank=True))
    return g


@pytest.fixture(scope="session")
def layers():
    made = {}

    def get(weight_dtype):
        if weight_dtype not in made:  # collective: the tests ask in the same order on every rank
            made[weight_dtype] = MoE(dist.group.WORLD, num_experts=E, hidden=H, intermediate=I, top_k=K,
                                     max_tokens_per_rank=TMAX, weight_dtype=weight_dtype)
        return made[weight_dtype]

    yield get
    torch.cuda.synchronize()
    dist.barrier()
    for layer in made.values():
        layer.close()


class Weights(ExpertWeights):
    """All E experts' weights (torch_helpers.ExpertWeights) for this module's shape."""

    def __init__(self, gen, fp8):
        super().__init__(gen, fp8, E, H, I)


def routing(gen, tokens, ids_dtype=torch.int32, all_to_rank=None):
    """K distinct experts per token, uniform over every rank's experts (or all on one rank's)."""
    scores = torch.rand((tokens, E), generator=gen, device=DEV)
    if all_to_rank is not None:
        owned = torch.zeros(E, dtype=torch.bool, device=DEV)
        owned[all_to_rank * (E // WORLD):(all_to_rank + 1) * (E // WORLD)] = True
        scores = torch.where(owned, scores + 1, scores)
    ids = scores.argsort(dim=1, descending=True)[:, :K]
    weights = torch.rand((tokens, K), generator=gen, device=DEV) + 0.05
    return ids.to(ids_dtype).contiguous(), (weights / weights.sum(dim=1, keepdim=True)).float().contiguous()


def check(y, x, ids, w, weights, fp8, scale=1.0, what=""):
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert not torch.isnan(y).any(), "rank %d %s: NaN in y" % (RANK, what)
    if x.shape[0] == 0:
        return
    expected = ref.moe_forward(x, ids, w, weights.ref13, weights.ref2, routed_scaling_factor=scale,
                               fp8_activations=fp8)
    err = ref.per_token_relative_error(y.float(), expected)
    bound = BOUND["fp8" if fp8 else "bf16"]
    assert float(err.max()) <= bound, "rank %d %s: worst token %d has relative error %.3g > %.3g" % (
        RANK, what, int(err.argmax()), float(err.max()), bound)


def tokens_per_rank(gen):
    """A different count on every rank; one rank (which one varies) sends nothing."""
    counts = torch.randint(1, TMAX + 1, (WORLD,), generator=gen, device=DEV)
    counts[int(torch.randint(0, WORLD, (1,), generator=gen, device=DEV))] = 0
    return int(counts[RANK])


def test_the_layer_spans_the_group(layers):
    layer = layers("bf16")
    assert layer.world_size == WORLD and layer.rank == RANK
    assert layer.experts_per_rank == E // WORLD and layer.first_expert == RANK * (E // WORLD)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_forward_matches_reference(layers, shared_gen, rank_gen, weight_dtype, ids_dtype):
    layer = layers(weight_dtype)
    weights = Weights(shared_gen, fp8=weight_dtype == "fp8")
    weights.load(layer)
    for step in range(3):
        tokens = tokens_per_rank(shared_gen)
        x = uniform(rank_gen, (tokens, H))
        ids, w = routing(rank_gen, tokens, ids_dtype)
        if step == 1:  # the operator itself, as torch.compile'd code calls it
            y = torch.ops.megamoe.forward(layer.handle, x, None, ids, w, 2.5, None)
        else:
            y = layer.forward(x, ids, w, routed_scaling_factor=2.5)
        layer.synchronize()  # bounded: a dead rank raises instead of hanging the job
        check(y, x, ids, w, weights, weight_dtype == "fp8", 2.5, "%s step %d (%d tokens)" % (weight_dtype, step, tokens))


@pytest.mark.parametrize("target", range(WORLD))
def test_every_token_to_one_rank(layers, shared_gen, rank_gen, target):
    layer = layers("bf16")
    weights = Weights(shared_gen, fp8=False)
    weights.load(layer)
    x = uniform(rank_gen, (TMAX, H))
    ids, w = routing(rank_gen, TMAX, all_to_rank=target)
    y = layer.forward(x, ids, w)
    layer.synchronize()
    check(y, x, ids, w, weights, False, what="all to rank %d" % target)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
def test_one_graph_for_every_token_count(layers, shared_gen, rank_gen, weight_dtype):
    """One captured graph, a device-side count per replay (0 included); each replay equals eager."""
    layer = layers(weight_dtype)
    weights = Weights(shared_gen, fp8=weight_dtype == "fp8")
    weights.load(layer)
    x = uniform(rank_gen, (TMAX, H))
    ids, w = routing(rank_gen, TMAX, torch.int64)
    count = torch.zeros(1, dtype=torch.int32, device=DEV)
    graph, y = capture(lambda: layer.forward(x, ids, w, num_tokens=count))
    for _ in range(4):
        tokens = tokens_per_rank(shared_gen)
        x.copy_(uniform(rank_gen, (TMAX, H)))
        new_ids, new_w = routing(rank_gen, TMAX, torch.int64)
        ids.copy_(new_ids)
        w.copy_(new_w)
        y.fill_(float("nan"))
        count.fill_(tokens)
        graph.replay()
        layer.synchronize()  # bounded: a dead rank raises instead of hanging the job
        replayed = y[:tokens].clone()
        eager = layer.forward(x[:tokens].contiguous(), ids[:tokens].contiguous(), w[:tokens].contiguous())
        layer.synchronize()
        assert torch.equal(replayed, eager), "rank %d: replay with %d tokens differs from eager" % (RANK, tokens)
        check(replayed, x[:tokens], ids[:tokens], w[:tokens], weights, weight_dtype == "fp8", what="graph %d" % tokens)
    del graph


def test_bad_expert_id_is_reported_on_its_rank_only(layers, shared_gen, rank_gen):
    layer = layers("bf16")
    weights = Weights(shared_gen, fp8=False)
    weights.load(layer)
    x = uniform(rank_gen, (16, H))
    ids, w = routing(rank_gen, 16)
    if RANK == WORLD - 1:
        ids[3, 1] = E + 5
    layer.forward(x, ids, w)
    if RANK == WORLD - 1:
        with pytest.raises(RuntimeError, match=r"topk_ids\[3, 1\] = %d" % (E + 5)):
            layer.synchronize()
    else:
        layer.synchronize()
    # The layer keeps working on every rank.
    ids, w = routing(rank_gen, 16)
    y = layer.forward(x, ids, w)
    layer.synchronize()
    check(y, x, ids, w, weights, False, what="after a bad id")
