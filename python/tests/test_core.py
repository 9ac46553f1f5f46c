"""Torch-free tests: they need libmegamoe.so but no GPU, no driver and no PyTorch."""

import math
import re

import pytest

import megamoe
from megamoe import _lib
from megamoe.core import parse_forward_impl

# The tests' small shape: H=512, I=256, E=16, K=4, one rank, 256 tokens.
SMALL = dict(hidden=512, intermediate=256, num_experts=16, top_k=4, max_tokens_per_rank=256, ep_size=1)
DSV3 = dict(hidden=7168, intermediate=2048, num_experts=256, top_k=8, max_tokens_per_rank=4096, ep_size=8)


# ---- library search (no library needed)


def test_search_order_env_overrides(monkeypatch, tmp_path):
    fake = tmp_path / "libmegamoe.so"
    fake.write_bytes(b"")
    monkeypatch.setenv("MEGAMOE_LIBRARY", str(fake))
    assert _lib.find_library() == fake
    monkeypatch.setenv("MEGAMOE_LIBRARY", str(tmp_path))  # a folder holding it
    assert _lib.find_library() == fake


def test_search_env_missing_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAMOE_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(_lib.LibraryNotFoundError, match="MEGAMOE_LIBRARY"):
        _lib.find_library()


def test_search_without_env_names_build_script(monkeypatch):
    monkeypatch.delenv("MEGAMOE_LIBRARY", raising=False)
    where = [w for w, _ in _lib.candidate_paths()]
    assert where == ["the installed package", "the repository's build output"]
    try:
        _lib.find_library()
    except _lib.LibraryNotFoundError as e:
        assert "scripts/build.sh" in str(e)


# ---- with the library


def test_version(lib):
    v = megamoe.version()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", v), v
    assert megamoe.abi_version() == _lib.ABI_VERSION
    assert megamoe.library_path().is_file()


def test_preset_is_the_library_s(lib):
    assert megamoe.preset("dsv4-flash") == {"hidden": 4096, "intermediate": 2048, "num_experts": 256, "top_k": 6,
                                            "swiglu_limit": 10.0}
    assert megamoe.preset("dsv3") == {"hidden": 7168, "intermediate": 2048, "num_experts": 256, "top_k": 8,
                                      "swiglu_limit": 0.0}
    with pytest.raises(ValueError, match="dsv2"):
        megamoe.preset("dsv2")
    with pytest.raises(ValueError, match="must be a string"):
        megamoe.preset(None)


def test_validate_shape_good(lib):
    megamoe.validate_shape(**SMALL)
    megamoe.validate_shape(**SMALL, weight_dtype="fp8", swiglu_limit=10.0)
    megamoe.validate_shape(**DSV3, weight_dtype="fp8")
    megamoe.validate_shape(hidden=4096, intermediate=2048, num_experts=256, top_k=6, max_tokens_per_rank=1,
                           ep_size=64, swiglu_limit=10)


@pytest.mark.parametrize("field, value", [
    ("hidden", 100),
    ("hidden", 0),
    ("hidden", -128),
    ("intermediate", 200),
    ("num_experts", 0),
    ("num_experts", 4096),
    ("top_k", 0),
    ("top_k", 17),
    ("ep_size", 0),
    ("ep_size", 65),
    ("max_tokens_per_rank", 0),
    ("swiglu_limit", -1.0),
    ("swiglu_limit", math.nan),
    ("swiglu_limit", math.inf),
])
def test_validate_shape_bad(lib, field, value):
    shape = dict(SMALL)
    shape[field] = value
    with pytest.raises(ValueError) as info:
        megamoe.validate_shape(**shape)
    message = str(info.value)
    assert message.startswith(field + " = "), message


def test_validate_shape_bad_combinations(lib):
    with pytest.raises(ValueError, match=r"^num_experts = 10: must be divisible by ep_size = 4"):
        megamoe.validate_shape(**dict(SMALL, num_experts=10, ep_size=4))
    with pytest.raises(ValueError, match=r"^top_k = 5: "):  # top_k > num_experts
        megamoe.validate_shape(**dict(SMALL, num_experts=4, top_k=5))
    with pytest.raises(ValueError, match=r"^max_tokens_per_rank = "):  # int32 device indices
        megamoe.validate_shape(**dict(SMALL, max_tokens_per_rank=1 << 40))


@pytest.mark.parametrize("field, value", [("hidden", 512.5), ("top_k", "4"), ("ep_size", None), ("hidden", 1 << 70)])
def test_validate_shape_not_an_integer(lib, field, value):
    with pytest.raises(ValueError, match="^" + field + " = "):
        megamoe.validate_shape(**dict(SMALL, **{field: value}))


def test_validate_shape_weight_dtype(lib):
    for ok in ("bf16", "fp8", "bfloat16", "float8_e4m3fn"):
        megamoe.validate_shape(**SMALL, weight_dtype=ok)
    with pytest.raises(ValueError, match="^weight_dtype = 'int4'"):
        megamoe.validate_shape(**SMALL, weight_dtype="int4")


def _row(table, region):
    for line in table.splitlines():
        if line.split() and line.split()[0] == region:
            return line.split()
    raise AssertionError("region %s not in the table:\n%s" % (region, table))


REGIONS = ["expert_recv_count", "send_pair_count", "dispatch_done_ctas", "expert_arrived_rows", "barrier_flags",
           "source_pair_count", "recv_pairs", "token_staging", "token_staging_scale", "combine_recv", "token_pool",
           "token_pool_scale", "pool_source", "expert_row_offset", "expert_tile_offset", "fc1_tiles_done",
           "gemm_items_taken", "fc1_out", "fc1_out_scale", "device_status"]


def test_workspace_table_bf16(lib):
    table = megamoe.workspace_table(**SMALL)
    assert table.splitlines()[0].split()[:3] == ["region", "arena", "type"]
    for region in REGIONS:
        _row(table, region)
    # token_pool: W*Tmax*K*H bf16 = 1 * 256 * 4 * 512 * 2 B = 1 MiB, in the local arena
    pool = _row(table, "token_pool")
    assert pool[1] == "local" and pool[2] == "bf16", pool
    assert "1.00 MiB" in " ".join(pool), pool
    # the counters are the must-zero prefix of the symmetric arena
    assert _row(table, "expert_recv_count")[1] == "symmetric"
    assert _row(table, "expert_recv_count")[-1] == "yes"
    assert _row(table, "token_pool")[-1] == "no"
    # no scales without fp8
    for region in ("token_staging_scale", "token_pool_scale", "fc1_out_scale"):
        assert "(unused)" in _row(table, region), region
    assert re.search(r"symmetric arena .*, local arena .*, total ", table), table


def test_workspace_table_fp8(lib):
    table = megamoe.workspace_table(**SMALL, weight_dtype="fp8")
    pool = _row(table, "token_pool")
    assert pool[2] == "e4m3", pool
    assert "512.00 KiB" in " ".join(pool), pool  # 1 byte per element
    for region in ("token_staging_scale", "token_pool_scale", "fc1_out_scale"):
        row = _row(table, region)
        assert "(unused)" not in row and row[2] == "fp32", row
    # token_pool_scale: W*Tmax*K*H/128 fp32 = 256 * 4 * 4 * 4 B = 16 KiB
    assert "16.00 KiB" in " ".join(_row(table, "token_pool_scale"))


def test_workspace_table_scales_with_ep(lib):
    one = megamoe.workspace_table(**DSV3)
    # every region named, and the table grows with the shape (pool holds W*Tmax*K rows)
    assert "GiB" in " ".join(_row(one, "token_pool"))


def test_workspace_table_with_a_windowed_pool(lib):
    # SMALL's worst case is 1 * 256 * 4 = 1024 pool rows; 256 rows are a quarter of the token pool
    # (and of fc1_out), in both dtypes.
    assert "1.00 MiB" in " ".join(_row(megamoe.workspace_table(**SMALL, pool_rows=0), "token_pool"))
    table = megamoe.workspace_table(**SMALL, pool_rows=256)
    assert "256.00 KiB" in " ".join(_row(table, "token_pool")), _row(table, "token_pool")
    assert "pool_windows" in table
    fp8 = megamoe.workspace_table(**SMALL, weight_dtype="fp8", pool_rows=256)
    assert "128.00 KiB" in " ".join(_row(fp8, "token_pool")), _row(fp8, "token_pool")
    # at least the worst case: no windows, the worst-case pool
    assert "1.00 MiB" in " ".join(_row(megamoe.workspace_table(**SMALL, pool_rows=2048), "token_pool"))


@pytest.mark.parametrize("rows", [100, -256, 255])
def test_workspace_table_bad_pool_rows(lib, rows):
    with pytest.raises(ValueError, match="^pool_rows = %d: must be 0 .* or a positive multiple of 256" % rows):
        megamoe.workspace_table(**SMALL, pool_rows=rows)


def test_compact_pool_rows(lib):
    # SMALL: 1.25 x 1024 + 256 x 16 experts is above the 1024 worst-case rows: no smaller pool.
    assert megamoe.compact_pool_rows(**SMALL) == 0
    # DSV3 at EP 8: 1.25 x 4096 x 8 + 256 x 32 = 49152 rows, a multiple of 256, against 262144.
    rows = megamoe.compact_pool_rows(**DSV3)
    assert rows == 49152
    worst = megamoe.workspace_table(**DSV3)
    compact = megamoe.workspace_table(**DSV3, pool_rows=rows)
    total = lambda t: re.search(r"total ([0-9.]+ [KMG]iB)", t).group(1)  # noqa: E731
    assert total(compact) != total(worst), (total(compact), total(worst))
    with pytest.raises(ValueError, match="^top_k = 0: "):
        megamoe.compact_pool_rows(**dict(DSV3, top_k=0))


def test_largest_pool_rows_within(lib):
    # dsv4-flash BF16 at EP 8 and 8192 tokens per rank within 1 GiB: 48128 rows (the C++ tests' value).
    dsv4_flash = dict(hidden=4096, intermediate=2048, num_experts=256, top_k=6, max_tokens_per_rank=8192, ep_size=8)
    assert megamoe.largest_pool_rows_within(**dsv4_flash, max_bytes=1 << 30) == 48128
    total = lambda t: re.search(r"total ([0-9.]+) MiB", t).group(1)  # noqa: E731
    assert total(megamoe.workspace_table(**dsv4_flash, pool_rows=48128)) == "1021.00"
    # Room for every pair of every rank: the worst case; no room for one window's pool: 0.
    assert megamoe.largest_pool_rows_within(**SMALL, max_bytes=1 << 40) == 4 * 256
    assert megamoe.largest_pool_rows_within(**DSV3, max_bytes=1 << 20) == 0
    with pytest.raises(ValueError, match="^max_bytes = -1: must be >= 0"):
        megamoe.largest_pool_rows_within(**SMALL, max_bytes=-1)
    with pytest.raises(ValueError, match="^top_k = 0: "):
        megamoe.largest_pool_rows_within(**dict(SMALL, top_k=0), max_bytes=1 << 30)


def test_workspace_table_invalid_shape(lib):
    with pytest.raises(ValueError, match="^intermediate = 100: "):
        megamoe.workspace_table(**dict(SMALL, intermediate=100))


def test_error_message_is_per_call(lib):
    with pytest.raises(ValueError, match="^hidden"):
        megamoe.validate_shape(**dict(SMALL, hidden=1))
    megamoe.validate_shape(**SMALL)  # a good call after a bad one still succeeds
    with pytest.raises(ValueError, match="^top_k"):
        megamoe.validate_shape(**dict(SMALL, top_k=0))


@pytest.mark.parametrize("value, code", [(None, 0), ("staged", 1), ("fused", 2)])
def test_parse_forward_impl(value, code):
    assert parse_forward_impl(value) == code


@pytest.mark.parametrize("value", ["", "Fused", "default", 1, True])
def test_parse_forward_impl_bad(value):
    with pytest.raises(ValueError, match="^impl = .*: must be None, 'staged' or 'fused'$"):
        parse_forward_impl(value)
