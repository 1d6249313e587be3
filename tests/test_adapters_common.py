"""The adapters' engine-independent parts (``engine_backend.adapters.common``), on CPU, without either engine."""

from __future__ import annotations

import logging

import pytest
import torch

from engine_backend import log
from engine_backend.adapters.common import faults
from engine_backend.adapters.common.kernels import KernelLimits, KernelsByShape, LayerKernels, LayerShape
from engine_backend.adapters.common.queries import query_rows
from engine_backend.adapters.common.variant import variant_for
from engine_backend.variants import Variant

HQ, HKV, D = 32, 8, 128


def fused_qkv(tokens: int) -> torch.Tensor:
    return torch.randn(tokens, (HQ + 2 * HKV) * D, dtype=torch.bfloat16)


def test_a_fused_qkv_column_slice_is_read_in_place():
    qkv = fused_qkv(5)
    q = qkv[:, : HQ * D]  # what SGLang's models hand attention: rows strided by the QKV width
    rows = query_rows(q, HQ, D)
    assert rows.data_ptr() == qkv.data_ptr()  # no copy
    assert rows.stride() == (qkv.shape[1], D, 1) and not rows.is_contiguous()
    assert torch.equal(rows, q.contiguous().view(-1, HQ, D))


def test_a_slice_off_16_byte_boundaries_is_copied():
    qkv = fused_qkv(3)
    q = qkv[:, 4 : 4 + HQ * D]  # 8 bytes in: 16-byte loads cannot read it
    rows = query_rows(q, HQ, D)
    assert rows.is_contiguous() and rows.data_ptr() != qkv.data_ptr()
    assert torch.equal(rows, q.contiguous().view(-1, HQ, D))


def test_contiguous_queries_pass_through_and_three_dim_ones_too():
    q = torch.randn(4, HQ * D, dtype=torch.float16)
    assert query_rows(q, HQ, D).data_ptr() == q.data_ptr()
    q3 = q.view(4, HQ, D)
    assert query_rows(q3, HQ, D).data_ptr() == q3.data_ptr()


# ------------------------------------------------------------------ variant_for
def test_variant_for_treats_none_zero_and_negative_as_off():
    assert variant_for().is_default
    assert variant_for(window_left=None, logits_soft_cap=0.0, alibi=False).is_default
    assert variant_for(window_left=-1, logits_soft_cap=None).is_default
    v = variant_for(window_left=0, logits_soft_cap=30, alibi=True)
    assert (v.window_left, v.logits_soft_cap, v.alibi) == (0, 30.0, True)


# ------------------------------------------------------------------ faults
@pytest.fixture
def warnings_logged():
    """Warnings the package logs, captured on whatever logger it uses."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = log.logger()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_no_fault_unless_the_variable_names_one(monkeypatch, warnings_logged):
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    assert faults.dropped_kv_tokens() == 0
    monkeypatch.setenv(faults.FAULT_ENV, " ")
    assert faults.dropped_kv_tokens() == 0
    assert warnings_logged == []


def test_the_fault_drops_one_kv_token_and_says_so(monkeypatch, warnings_logged):
    monkeypatch.setenv(faults.FAULT_ENV, faults.DROP_LAST_KV)
    assert faults.dropped_kv_tokens() == 1
    assert ["FAULT INJECTION" in record.getMessage() for record in warnings_logged] == [True]


def test_an_unknown_fault_is_an_error_naming_the_known_ones(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "drop_everything")
    with pytest.raises(ValueError, match="not a known fault; known: \\['drop_last_kv'\\]"):
        faults.dropped_kv_tokens()


def test_drop_kv_shortens_lengths_never_below_zero():
    lens = torch.tensor([0, 1, 7], dtype=torch.int32)
    assert faults.drop_kv(lens, 0) is lens
    assert faults.drop_kv(lens, 1).tolist() == [0, 0, 6]
    assert lens.tolist() == [0, 1, 7]  # the engine's tensor is left as it was


# ------------------------------------------------------------------ kernels by shape
class Recorded:
    """A ``LayerKernels`` stand-in recording what it is asked to do."""

    def __init__(self, shape, capacity=4):
        self.shape, self.decode_capacity, self.plans = shape, capacity, []

    def plan(self, decode=None, prefill=None, **counts):
        self.plans.append((decode, prefill, counts))

    def ensure_decode_capacity(self, rows):
        self.decode_capacity = max(self.decode_capacity, rows)


FULL = LayerShape(8, 2, 64, 0.125, Variant())
WINDOWED = LayerShape(8, 2, 64, 0.125, Variant(window_left=127))


def test_kernels_are_built_once_per_distinct_shape_in_first_seen_order():
    built = []
    kernels = KernelsByShape([WINDOWED, FULL, WINDOWED], lambda shape: built.append(shape) or Recorded(shape))
    assert built == [WINDOWED, FULL] and len(kernels) == 2
    assert kernels[WINDOWED].shape == WINDOWED and kernels[FULL].shape == FULL
    with pytest.raises(RuntimeError, match="not for LayerShape"):
        kernels[LayerShape(8, 2, 128, 0.125, Variant())]


def test_every_shape_is_planned_on_the_same_step_and_grown_together():
    kernels = KernelsByShape([FULL, WINDOWED], Recorded)
    decode, prefill = object(), object()
    kernels.plan(decode, prefill, num_prefill_tokens=5, num_prefill_kv_tokens=9)
    for shape in (FULL, WINDOWED):
        assert kernels[shape].plans == [(decode, prefill, {"num_prefill_tokens": 5, "num_prefill_kv_tokens": 9})]
    kernels[FULL].decode_capacity = 8
    assert kernels.decode_capacity == 4  # the smallest: every shape must fit the batch
    kernels.ensure_decode_capacity(16)
    assert [k.decode_capacity for k in kernels.values()] == [16, 16]


class PlanRecorder:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def plan(self, bsr, **counts):
        self.calls.append((bsr, counts))


class RecordingKernels(LayerKernels):
    """``LayerKernels`` with wrappers that record their plans instead of building GPU kernels."""

    def _make_decode(self, max_batch_size):
        return PlanRecorder(max_batch_size)

    def _make_prefill(self):
        return PlanRecorder(self.limits.max_prefill_rows)


def recording_kernels():
    limits = KernelLimits(max_decode_rows=4, max_prefill_rows=3, max_prefill_tokens=64)
    return RecordingKernels(FULL, page_size=16, dtype=torch.bfloat16, limits=limits, device="cpu")


def test_each_part_is_planned_on_its_wrapper_with_the_prefill_host_counts():
    kernels = recording_kernels()
    decode, prefill = object(), object()
    kernels.plan(decode, None)
    kernels.plan(None, prefill, num_prefill_tokens=48, num_prefill_kv_tokens=340)
    assert kernels.decode.calls == [(decode, {})]
    assert kernels.prefill.calls == [(prefill, {"num_tokens": 48, "num_kv_tokens": 340})]


def test_decode_capacity_grows_by_a_new_wrapper_and_never_shrinks():
    kernels = recording_kernels()
    first = kernels.decode
    assert (kernels.decode_capacity, first.rows) == (4, 4)
    kernels.ensure_decode_capacity(3)
    assert kernels.decode is first
    kernels.ensure_decode_capacity(9)
    assert kernels.decode is not first and (kernels.decode_capacity, kernels.decode.rows) == (9, 9)
