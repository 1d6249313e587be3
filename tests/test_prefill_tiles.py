"""The prefill tile-shape table and the plan's choice between its shapes (host side, no GPU)."""

from __future__ import annotations

import torch

from engine_backend.kernels import catalog
from engine_backend.prefill import LONG_QUERY_TOKENS, TileShape, kernel_spec, pick_tile, tile_shapes
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
    specs = {kernel_spec(torch.bfloat16, 128, DEFAULT, shape) for shape in tile_shapes(128)}
    assert len(specs) == 2
    assert specs <= set(catalog.default_specs(with_test_variants=False))
    params = dict(kernel_spec(torch.bfloat16, 128, DEFAULT, TileShape(8, 64)).params)
    assert (params["WARPS"], params["KV_TILE"]) == ("8", "64")
