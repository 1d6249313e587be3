"""Decode-step profile summaries from torch-profiler Chrome traces (CPU only).

The traces are built here in the shape torch.profiler's ``export_chrome_trace`` writes (the engines'
live profilers use it): complete events (``ph: "X"``) with ``cat`` "kernel" for GPU kernels and
"cuda_runtime" for runtime calls such as ``cudaGraphLaunch``, times in microseconds.
"""

from __future__ import annotations

import gzip
import json
import random

import pytest

from e2e.step_profile import (OTHER, batch_report, category, decode_attention_by_batch, main, profile, read_trace,
                               report, trace_files)

OUR_DECODE = "eb::(anonymous namespace)::decode_kernel(eb::DecodeParams)"
OUR_PLAN = "eb::(anonymous namespace)::decode_plan_kernel(int const*, int const*, int, eb::DecodePlan, int, int, int, int)"
GEMM = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
NORM = "void vllm::rms_norm_kernel<c10::BFloat16>(...)"


def kernel(name, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def graph_launch(ts):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "dur": 5, "pid": 1, "tid": 1}


def random_steps(rng, steps, layers):
    """Per step: one plan kernel, then per layer a GEMM, our decode kernel and a norm, back to back;
    steps separated by an idle gap. Returns the events and the exact totals they hold."""
    events, totals, t = [], {"engine_backend plan": 0.0, "engine_backend attention": 0.0, "GEMM": 0.0, OTHER: 0.0}, 0.0
    idle = 0.0
    for _ in range(steps):
        events.append(graph_launch(t))
        for name, cat in [(OUR_PLAN, "engine_backend plan")] + [
            (n, c) for _ in range(layers) for n, c in ((GEMM, "GEMM"), (OUR_DECODE, "engine_backend attention"), (NORM, OTHER))
        ]:
            dur = rng.uniform(1, 50)
            events.append(kernel(name, t, dur))
            totals[cat] += dur
            t += dur
        gap = rng.uniform(10, 100)
        idle += gap
        t += gap
    idle -= gap  # the trailing gap is outside the kernels' span
    return events, totals, idle


def test_categories_of_known_kernels():
    assert category(OUR_PLAN) == "engine_backend plan"  # before the attention pattern it also matches
    assert category(OUR_DECODE) == "engine_backend attention"
    assert category("eb::(anonymous namespace)::token_table_kernel(eb::TokenTableParams)") == "engine_backend plan"
    assert category("eb::(anonymous namespace)::merge_many_kernel(...)") == "engine_backend attention"
    assert category("void flashinfer::BatchPrefillWithPagedKVCacheKernel<...>(...)") == "flashinfer attention"
    assert category("_fwd_grouped_kernel_stage1") == "triton attention"
    assert category("kernel_unified_attention_2d") == "triton attention"
    assert category("void flash::flash_fwd_splitkv_kernel<...>(...)") == "flash-attention"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert category(NORM) == OTHER


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_profile_sums_per_step_and_idle_time(seed):
    rng = random.Random(seed)
    steps, layers = rng.randint(2, 6), rng.randint(1, 5)
    events, totals, idle = random_steps(rng, steps, layers)
    rng.shuffle(events)  # trace order is not time order
    p = profile(events)
    assert p.steps == steps  # one graph launch per step
    for cat, us in totals.items():
        assert p.kernel_us[cat] == pytest.approx(us)
    assert p.idle_us == pytest.approx(idle)
    assert p.per_step(p.kernel_us["engine_backend attention"]) == pytest.approx(totals["engine_backend attention"] / steps)


def test_overlapping_kernels_count_once_in_busy_time():
    events = [graph_launch(0), kernel(GEMM, 0, 10), kernel(NORM, 5, 10), kernel(OUR_DECODE, 30, 5)]
    p = profile(events)
    assert p.busy_us == pytest.approx(20)  # [0, 15) and [30, 35)
    assert p.span_us == pytest.approx(35)
    assert p.idle_us == pytest.approx(15)


def test_steps_from_attention_launches_when_graphs_split_a_step(tmp_path, capsys):
    """SGLang replays several graphs per decode step: with the model's layers, steps = attention launches
    / layers, whatever the graph launches say."""
    rng = random.Random(5)
    steps, layers = 4, 3
    events, totals, _ = random_steps(rng, steps, layers)
    events += [graph_launch(-100.0 - i) for i in range(9)]  # extra graph launches, as SGLang's split graphs
    assert profile(events).steps == steps + 9
    p = profile(events, layers=layers)
    assert p.steps == steps
    assert p.per_step(p.kernel_us["engine_backend attention"]) == pytest.approx(totals["engine_backend attention"] / steps)
    path = tmp_path / "t-decode.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert main([str(path), "--layers", str(layers)]) == 0 and f"steps: {steps};" in capsys.readouterr().out


def test_long_gaps_are_pauses_not_idle():
    events = [graph_launch(0), kernel(GEMM, 0, 10), kernel(OUR_DECODE, 30, 5),  # 20 us idle
              kernel(GEMM, 5035, 10)]  # 5000 us without work: a pause
    p = profile(events)
    assert p.idle_us == pytest.approx(20) and p.pauses == 1 and p.pause_us == pytest.approx(5000)
    assert "1 pauses" in report(p)


def test_decode_attention_per_layer_by_batch():
    """Per layer: a norm kernel (grid = batch), then the decode attention (with a split-KV reduction for
    Triton); layers group by the batch of their step."""
    def norm(ts, batch):
        return {**kernel("void flashinfer::norm::FusedAddRMSNormKernel<8u>(...)", ts, 2), "args": {"grid": [batch, 1, 1]}}

    events = [norm(0, 48), kernel("_fwd_grouped_kernel_stage1", 5, 20), kernel("_fwd_kernel_stage2", 26, 3),
              norm(40, 48), kernel("_fwd_grouped_kernel_stage1", 45, 22), kernel("_fwd_kernel_stage2", 68, 3),
              norm(80, 56), kernel(OUR_DECODE, 85, 30), kernel(GEMM, 120, 50)]
    by_batch = decode_attention_by_batch(events)
    assert by_batch == {48: [23.0, 25.0], 56: [30.0]}
    table = batch_report(by_batch)
    assert "| 48 | 2 | 25.0 | 24.0 |" in table and "| 56 | 1 | 30.0 | 30.0 |" in table


def test_norm_kernels_are_not_attention():
    assert category("void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>(...)") == OTHER
    assert category("void flashinfer::BatchPrefillWithPagedKVCacheKernel<...>(...)") == "flashinfer attention"


def test_steps_must_be_known():
    with pytest.raises(ValueError, match="--steps"):
        profile([kernel(GEMM, 0, 10)])
    assert profile([kernel(GEMM, 0, 10)], steps=4).per_step(40) == 10
    with pytest.raises(ValueError, match="no GPU kernel events"):
        profile([graph_launch(0)])


def test_reads_gzipped_traces_from_folders(tmp_path, capsys):
    rng = random.Random(3)
    events, totals, _ = random_steps(rng, 3, 2)
    folder = tmp_path / "1700000000.0"
    folder.mkdir()
    with gzip.open(folder / "1700000000.1-TP-0-decode.trace.json.gz", "wt", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    (folder / "server_args.json").write_text("{}")  # not a trace: ignored
    assert [p.name for p in trace_files([tmp_path])] == ["1700000000.1-TP-0-decode.trace.json.gz"]
    assert len(read_trace(trace_files([tmp_path])[0])) == len(events)
    assert main([str(tmp_path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out
    assert f"| engine_backend attention | {totals['engine_backend attention'] / 3:.1f} |" in out


def test_no_trace_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        trace_files([tmp_path])


def test_host_report_ranks_host_operators_per_step(tmp_path, capsys):
    def host(cat, name, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": 0, "dur": dur, "pid": 1, "tid": 1}

    events = [kernel(OUR_DECODE, 0, 10), kernel(OUR_DECODE, 20, 10)]  # two steps of one layer
    events += [host("cpu_op", "aten::arange", 3), host("cpu_op", "aten::arange", 5), host("cuda_runtime", "cudaGraphLaunch", 40),
               host("kernel", "not host", 1000), {"ph": "i", "cat": "cpu_op", "name": "instant", "ts": 0}]
    path = tmp_path / "t.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert main([str(path), "--layers", "1", "--host"]) == 0
    table = capsys.readouterr().out.split("| host operator |")[1].splitlines()
    assert table[2] == "| `cudaGraphLaunch` | cuda_runtime | 20.0 | 0.5 |"  # 40 us over 2 steps, first
    assert table[3] == "| `aten::arange` | cpu_op | 4.0 | 1.0 |"
    assert len(table) == 4  # GPU kernels and instant events are not host operators
