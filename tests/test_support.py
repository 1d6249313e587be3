"""check_supported: what a backend accepts at selection time, and how it says no."""

from __future__ import annotations

import pytest
import torch

from engine_backend import Variant
from engine_backend.support import check_supported

SUPPORTED_LIST = "Supported: head dims [64, 128, 256], dtypes [float16, bfloat16]"


@pytest.mark.parametrize(
    "config",
    [
        dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, page_size=16),
        dict(num_qo_heads=16, num_kv_heads=16, head_dim=64, dtype=torch.float16),
        dict(num_qo_heads=8, num_kv_heads=1, head_dim=256, dtype=torch.bfloat16, page_size=1),
        dict(num_qo_heads=64, num_kv_heads=1, head_dim=128, dtype=torch.float16, kv_dtype=torch.float16),
        dict(num_qo_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16, variant=Variant(logits_soft_cap=30.0)),
        dict(num_qo_heads=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, variant=Variant(alibi=True)),
        dict(num_qo_heads=4, num_kv_heads=4, head_dim=64, dtype=torch.float16, variant=Variant(window_left=127)),
    ],
)
def test_supported_configs_pass(config):
    check_supported(**config)


BASE = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "change, problem",
    [
        (dict(head_dim=96), "head dim 96"),
        (dict(kv_dtype=torch.float8_e4m3fn), "KV cache dtype torch.float8_e4m3fn differing from the query dtype"),
        (dict(dtype=torch.float32), "dtype torch.float32"),
        (dict(num_qo_heads=12, num_kv_heads=8), "12 query heads over 8 KV heads"),
        (dict(num_kv_heads=0), "32 query heads over 0 KV heads"),
        (dict(num_qo_heads=128, num_kv_heads=1), "128 query heads per KV head"),
        (dict(page_size=3), "page size 3"),
        (dict(variant=Variant(alibi=True, logits_soft_cap=5.0)), "ALiBi together with logits soft-cap"),
    ],
)
def test_unsupported_configs_name_the_problem_and_what_is_supported(change, problem):
    with pytest.raises(ValueError) as err:
        check_supported(**{**BASE, **change})
    message = str(err.value)
    assert f"engine_backend does not support {problem}" in message
    assert SUPPORTED_LIST in message
    assert "KV cache in the same dtype" in message and "page sizes [1, 2, 4" in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        check_supported(num_qo_heads=6, num_kv_heads=4, head_dim=96, dtype=torch.bfloat16, page_size=5)
    for problem in ("head dim 96", "page size 5", "6 query heads over 4 KV heads"):
        assert problem in str(err.value)


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan")])
def test_prefill_refuses_a_scale_it_cannot_fold(scale):
    """The prefill kernel takes its running max on raw dot products and folds the scale into exp2, which
    is right only for a positive scale: anything else is refused before any device or kernel is touched."""
    from engine_backend.prefill import BatchPrefill

    with pytest.raises(ValueError, match="sm_scale must be (positive|finite)"):
        BatchPrefill(32, 8, 128, 16, sm_scale=scale)
