"""The prefill tile-shape table and the plan's choice between its shapes (host side, no GPU)."""

from __future__ import annotations

import torch

import pytest

from engine_backend.kernels import catalog
from engine_backend.kernels.specs import prefill_spec
from engine_backend.prefill import (
    LONG_QUERY_TOKENS,
    HOPPER_LONG_KEYS_PER_QUERY,
    TileShape,
    check_tile,
    pick_tile,
    tile_shapes,
)
from engine_backend.variants import DEFAULT

SHORT, LONG = TileShape(4, 32), TileShape(4, 64)


def test_pick_tile_by_mean_query_tokens_per_request():
    assert pick_tile(SHORT, LONG, num_tokens=LONG_QUERY_TOKENS * 4 - 1, rows=4) == SHORT
    assert pick_tile(SHORT, LONG, num_tokens=LONG_QUERY_TOKENS * 4, rows=4) == LONG
    assert pick_tile(SHORT, LONG, num_tokens=1, rows=1) == SHORT  # a decode row on the prefill path
    assert pick_tile(SHORT, LONG, num_tokens=None, rows=4) == LONG  # unknown count


def test_head_dim_128_has_two_shapes_others_one():
    short, long = tile_shapes(128)
    assert short != long and long.kv_tile > short.kv_tile  # long queries: longer K/V tiles
    for dim in (64, 256):
        assert len(set(tile_shapes(dim))) == 1


def test_each_shape_is_its_own_specialization_and_in_the_catalog():
    specs = {prefill_spec(torch.bfloat16, 128, DEFAULT, shape) for shape in tile_shapes(128)}
    assert len(specs) == 2
    assert specs <= set(catalog.default_specs(with_test_variants=False, arch="80"))
    hopper = {prefill_spec(torch.bfloat16, 128, DEFAULT, shape) for shape in tile_shapes(128, "90a")}
    assert hopper <= set(catalog.default_specs(with_test_variants=False, arch="90a"))
    params = dict(prefill_spec(torch.bfloat16, 128, DEFAULT, TileShape(8, 64)).params)
    assert (params["WARPS"], params["KV_TILE"]) == ("8", "64")


def test_wgmma_tiles_are_checked_before_any_build():
    with pytest.raises(ValueError, match="mainloop"):
        TileShape(4, 64, "tma")
    with pytest.raises(ValueError, match="whole warpgroups"):
        TileShape(2, 64, "wgmma")
    with pytest.raises(ValueError, match="64 or 128 keys"):
        TileShape(4, 32, "wgmma")
    hopper = TileShape(4, 64, "wgmma")
    check_tile(hopper, 128, "90a")
    with pytest.raises(ValueError, match="Hopper only .* not on sm_80"):
        check_tile(hopper, 128, "80")
    with pytest.raises(ValueError, match="head dims 64 and 128, not 256"):
        check_tile(hopper, 256, "90a")
    check_tile(TileShape(4, 64), 256, "80")  # mma.sync runs anywhere


def test_mainloop_is_a_template_parameter():
    mma = dict(prefill_spec(torch.bfloat16, 128, DEFAULT, TileShape(4, 64)).params)
    wgmma = dict(prefill_spec(torch.bfloat16, 128, DEFAULT, TileShape(4, 64, "wgmma")).params)
    assert (mma["WGMMA"], wgmma["WGMMA"]) == ("0", "1")
    for dim in (64, 128, 256):
        assert all(shape.mainloop == "mma" for shape in tile_shapes(dim))  # no arch: what every sm80+ GPU runs


def test_hopper_plans_take_the_long_wgmma_shape_for_long_kv_only():
    short, long = tile_shapes(128, "90a")
    assert (short.mainloop, long.mainloop) == ("wgmma", "wgmma")
    assert short.kv_tile < long.kv_tile
    assert tile_shapes(256, "90a") == tile_shapes(256)  # no wgmma at head dim 256
    keys = HOPPER_LONG_KEYS_PER_QUERY  # KV per request less half its queries
    assert pick_tile(short, long, num_tokens=4 * 2 * keys, rows=4) == long  # prefill: queries = KV
    assert pick_tile(short, long, num_tokens=4 * 2 * keys - 2, rows=4) == short
    append = 512  # new tokens per request, onto a cache
    assert pick_tile(short, long, num_tokens=8 * append, rows=8, num_kv_tokens=8 * (keys + append // 2)) == long
    assert pick_tile(short, long, num_tokens=8 * append, rows=8, num_kv_tokens=8 * (keys + append // 2) - 1) == short
    assert pick_tile(short, long, num_tokens=8 * 512, rows=8, num_kv_tokens=8 * 8704) == long  # append, long cache
    assert pick_tile(short, long, num_tokens=16 * 1024, rows=16, num_kv_tokens=16 * 1024) == short
    assert pick_tile(short, long, num_tokens=None, rows=4) == long  # unknown count
    assert pick_tile(*tile_shapes(128), num_tokens=8 * 512, rows=8, num_kv_tokens=0) == tile_shapes(128)[1]


def test_plan_buffer_size_is_reported_by_the_kernel(cuda_home, kernel_cache, monkeypatch):
    """The plan buffer's layout is written once, in C++ (prefill/params.h); the op reports its size, which
    BatchPrefill allocates. Loading needs no GPU: the ops register with torch."""
    from engine_backend.kernels import jit

    monkeypatch.setenv(jit.CACHE_ENV, str(kernel_cache))
    ops = jit.load(prefill_spec(torch.bfloat16, 128, DEFAULT, tile_shapes(128)[1]), "90a")
    # a 4-int header, then per tile an int4 request record and its index within the request
    assert [int(ops.plan_ints(n)) for n in (0, 1, 100)] == [4, 9, 504]
    with pytest.raises(RuntimeError, match="max_tiles >= 0"):
        ops.plan_ints(-1)
