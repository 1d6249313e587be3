"""CPU tests of e2e/sglang_attention_check.py's judgement: what passes, what must fail, and the
weight re-initialisation that makes attention matter. (The check itself needs a GPU.)"""

import copy
import math

import pytest
import torch

from e2e import sglang_attention_check as check

pytestmark = pytest.mark.sglang

SMALL = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5}


def fake_run(name, seed, noise=0.0, base=None):
    """Results shaped like a child's, optionally a noisy copy of ``base``."""
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        waves = {
            "base": [
                dict(
                    prompt_logprobs=(-5 * torch.rand(40, generator=gen)).tolist(),
                    output_ids=torch.randint(0, 1000, (16,), generator=gen).tolist(),
                    output_logprobs=(-2 * torch.rand(16, generator=gen)).tolist(),
                )
                for _ in range(4)
            ]
        }
    else:
        waves = copy.deepcopy(base["waves"])
        for outs in waves.values():
            for o in outs:
                for key in ("prompt_logprobs", "output_logprobs"):
                    o[key] = [x + noise * float(torch.randn(1, generator=gen)) for x in o[key]]
    backend = check.CONFIGS[name]["backend"]
    return dict(
        config=name,
        workload={"layers": 4},
        backends={"attention_backend": backend},
        smoke_text="Paris",
        dummy_rms=5.8e-4,
        waves=waves,
    )


def all_runs(fault_noise=2.0):
    ref = fake_run("flashinfer", 0)
    runs = {"flashinfer": ref}
    for i, name in enumerate(["triton", "ours", "ours_paged"]):
        runs[name] = fake_run(name, i + 1, noise=0.005, base=ref)
    runs["fault"] = fake_run("fault", 9, noise=fault_noise, base=ref)
    return runs


def verdict(lines, title_start):
    matches = [ok for title, ok, _ in lines if title.startswith(title_start)]
    assert len(matches) == 1, title_start
    return matches[0]


def test_agreeing_runs_and_a_caught_fault_pass():
    lines = check.verdicts(all_runs())
    assert all(ok for _, ok, _ in lines), lines


def test_a_fault_that_goes_unnoticed_fails_the_check():
    lines = check.verdicts(all_runs(fault_noise=0.0))
    assert verdict(lines, "fault run is caught") is False


def test_a_deviating_backend_fails():
    runs = all_runs()
    runs["ours"] = fake_run("ours", 5, noise=0.2, base=runs["flashinfer"])
    lines = check.verdicts(runs)
    assert verdict(lines, "ours agrees") is False
    assert verdict(lines, "ours_paged agrees") is True


def test_a_silently_substituted_backend_fails():
    runs = all_runs()
    runs["ours"]["backends"] = {"attention_backend": "flashinfer"}
    assert verdict(check.verdicts(runs), "ours: runs with attention backend engine_backend") is False


def test_a_missing_configuration_fails():
    runs = all_runs()
    del runs["triton"]
    assert verdict(check.verdicts(runs), "triton was run") is False


def test_runs_with_different_workloads_are_not_compared_silently():
    runs = all_runs()
    runs["ours"]["workload"] = {"layers": 8}
    assert verdict(check.verdicts(runs), "all runs share one workload") is False


def test_decode_comparison_stops_where_greedy_paths_part():
    ref = dict(prompt_logprobs=[], output_ids=[1, 2, 3, 4], output_logprobs=[-0.1, -0.2, -0.3, -0.4])
    near_tie = dict(prompt_logprobs=[], output_ids=[1, 2, 9, 9], output_logprobs=[-0.1, -0.2, -0.31, -5.0])
    dev = check.Deviation()
    dev.add_decode(ref, near_tie)
    assert (dev.decode_compared, dev.decode_total, dev.bad_divergences) == (2, 4, 0)
    assert dev.within()  # 50% compared, no bad divergence
    far = dict(near_tie, output_logprobs=[-0.1, -0.2, -3.0, -5.0])
    dev = check.Deviation()
    dev.add_decode(ref, far)
    assert dev.bad_divergences == 1 and not dev.within()


def test_requests_of_differing_length_are_not_compared_silently():
    ref = dict(prompt_logprobs=[-1.0, -2.0, -3.0], output_ids=[1, 2], output_logprobs=[-0.1, -0.2])
    short = dict(ref, prompt_logprobs=[-1.0, -2.0])
    dev = check.Deviation()
    dev.add_prompt(ref, short)
    dev.add_decode(ref, short)
    assert dev.shape_mismatches == 1 and not dev.within()


def test_too_little_decode_coverage_is_inconclusive_hence_a_failure():
    ref = dict(prompt_logprobs=[], output_ids=[1, 2, 3, 4], output_logprobs=[-0.1] * 4)
    early = dict(prompt_logprobs=[], output_ids=[7, 2, 3, 4], output_logprobs=[-0.1] * 4)
    dev = check.Deviation()
    dev.add_decode(ref, early)
    assert dev.coverage == 0 and not dev.within()


def test_reinitialised_weights_make_attention_sharp_and_unit_scaled():
    named = dict(check.attention_weights(SMALL, layers=2, dummy_rms=1e-3 / math.sqrt(3)))
    hidden, heads, kv_heads, d = 256, 8, 2, 32
    assert named["model.layers.0.self_attn.q_proj.weight"].shape == (heads * d, hidden)
    assert named["model.layers.1.self_attn.k_proj.weight"].shape == (kv_heads * d, hidden)
    assert named["model.layers.0.self_attn.o_proj.weight"].shape == (hidden, heads * d)
    assert float(named["model.norm.weight"][0]) == check.LOGIT_GAIN

    # Layer 0's norm gain turns dummy embeddings into unit-RMS activations despite eps.
    emb = (torch.rand(64, hidden) * 2 - 1) * 1e-3
    gain = float(named["model.layers.0.input_layernorm.weight"][0])
    normed = emb / torch.sqrt(emb.pow(2).mean(-1, keepdim=True) + SMALL["rms_norm_eps"]) * gain
    assert abs(float(normed.pow(2).mean().sqrt()) - 1.0) < 0.05
    assert float(named["model.layers.1.input_layernorm.weight"][0]) == 1.0

    # A token's score against itself stands out for each KV head's first query head only.
    x = torch.randn(512, hidden)
    q = (x @ named["model.layers.0.self_attn.q_proj.weight"].float().T).view(512, heads, d)
    k = (x @ named["model.layers.0.self_attn.k_proj.weight"].float().T).view(512, kv_heads, d)
    self_scores = torch.einsum("thd,thd->th", q, k.repeat_interleave(heads // kv_heads, dim=1)) / math.sqrt(d)
    leaders = self_scores[:, :: heads // kv_heads].mean()
    others = self_scores[:, 1 :: heads // kv_heads].mean()
    assert float(leaders) > 2.0 and abs(float(others)) < 0.5
