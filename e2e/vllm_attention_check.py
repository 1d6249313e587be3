"""End-to-end check of engine_backend inside vLLM 0.26 (GPU): a check that can fail.

    python e2e/vllm_attention_check.py e2e/models/llama3-8b-shape --num-prompts 8 [--num-layers 8]

Runs one child process per configuration (the model lives in the child, V1 multiprocessing
off so that probes can reach it):

* ``custom``: ``vllm.LLM(model=DIR, load_format="dummy", attention_backend="CUSTOM")``:
  smoke-generates text, then the checks below;
* ``flash``: the same with ``FLASH_ATTN``, as calibration and comparison;
* ``fault``: ``custom`` with ``ENGINE_BACKEND_FAULT=drop_last_kv`` (every request attends to
  one KV token fewer); every check that gates PASS must catch it, or the check proves nothing.

vLLM's dummy weights are uniform in +-1e-3, so every backend generates the same tokens; each
child therefore re-initialises the weights deterministically at a working scale (unit-RMS
activations, q/k scaled so attention is sharp, logits with std ~4) before checking:

1. oracle: a probe wraps every attention layer's ``impl.forward``; after each eager call
   (prefills, and decode batches too large for the captured graphs) it recomputes causal
   attention in fp32 from vLLM's own ``query_start_loc`` / ``seq_lens`` / ``block_table``
   and the paged cache. Tolerance ``2^-6 * max|V|``: a bf16 kernel with fp32 scores and
   accumulation is within ``2^-9 * max|V|`` (probabilities rounded to bf16 before P.V) plus
   ``2^-9 * |out|`` (output rounding) of exact, i.e. ``2^-8 * max|V|``; the 4x margin admits
   one more bf16 rounding inside the kernel (a pre-scaled query, say), and FLASH_ATTN must
   pass the same oracle or the run FAILS. A dropped or misplaced key is far outside it: the
   first query of every prompt then sees nothing (or the wrong token), an O(|V|) error.
2. cross-backend: layer 0 of the first (all-prefill) step sees bit-identical inputs under
   both backends; outputs must agree within ``2^-5 * max|V|`` (two kernels, each within
   the oracle's tolerance).
3. CUDA graphs: decode batches of <= 4 requests replay full graphs (capture sizes 1, 2, 4;
   requests finish at different lengths, so the batch shrinks into them). Re-scoring every
   generated sequence as a prompt (eager prefill) must reproduce the sampled tokens'
   logprobs as closely as FLASH_ATTN does (``max(0.5, 4 x`` FLASH_ATTN's deviation``)``).

Prints a PASS/FAIL line per check and a summary; exit status 0 only on PASS.
Runs from a site dir on PYTHONPATH (no console scripts); registers the plugin itself when
the entry point is not installed.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib

from engine_backend.adapters.common.faults import DROP_LAST_KV as FAULT
from engine_backend.adapters.common.faults import FAULT_ENV

ORACLE_TOL = 2.0**-6  # x max|V|, see the module docstring
CROSS_TOL = 2.0**-5  # x max|V|
RESCORE_FLOOR = 0.5  # nats
CAPTURE_SIZES = [1, 2, 4]
CONFIGS = {
    "custom": dict(backend="CUSTOM", fault=None),
    "flash": dict(backend="FLASH_ATTN", fault=None),
    "fault": dict(backend="CUSTOM", fault=FAULT),
}


# =============================================================================== parent
def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            out = os.path.join(tmp, f"{name}.pt")
            env = dict(os.environ)
            env.pop(FAULT_ENV, None)
            if CONFIGS[name]["fault"]:
                env[FAULT_ENV] = CONFIGS[name]["fault"]
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", name, "--out", out]
            start = time.time()
            print(f"=== run {name}: backend {CONFIGS[name]['backend']}, fault {CONFIGS[name]['fault']}", flush=True)
            try:
                returncode = subprocess.run(cmd, env=env, timeout=args.child_timeout).returncode
            except subprocess.TimeoutExpired:
                returncode = "timeout"
            print(f"=== run {name}: exit {returncode} after {time.time() - start:.0f} s", flush=True)
            if returncode == 0 and os.path.exists(out):
                import torch

                results[name] = torch.load(out, weights_only=False)
    return summarize(results, args)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--num-layers", "--layers", type=int, default=None, help="override num_hidden_layers (faster)")
    p.add_argument("--prompt-len", type=int, default=48, help="longest prompt, in tokens")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs (skips check 3)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--child-timeout", type=int, default=900)
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


# =============================================================================== child
class Probe:
    """Collects, per eager attention call, the oracle error and (layer 0, first call) the output."""

    def __init__(self):
        self.active = False
        self.calls = []  # (layer, tokens, max_err, max_v)
        self.layer0_first = None  # (output fp32 cpu, max_v)

    def record(self, layer_index, query, kv_cache, metadata, output, scale):
        tokens = int(metadata.query_start_loc[-1])
        want, max_v = oracle(query, kv_cache, metadata, scale)
        got = output[:tokens].float()
        err = (got - want).abs().max().item() if tokens else 0.0
        self.calls.append((layer_index, tokens, err, max_v))
        if layer_index == 0 and self.layer0_first is None:
            self.layer0_first = (got.cpu(), max_v)


PROBE = Probe()


def kv_views(kv_cache, head_size):
    """(K, V) as [pages, page_size, kv_heads, head_size] for either backend's cache layout."""
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:  # CUSTOM: (2, blocks, page, heads, dim)
        return kv_cache[0], kv_cache[1]
    if kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * head_size:  # FLASH_ATTN: (blocks, heads, page, 2*dim)
        return kv_cache.transpose(1, 2).split(head_size, dim=-1)
    raise RuntimeError(f"unknown KV cache layout {tuple(kv_cache.shape)}")


def oracle(query, kv_cache, metadata, scale):
    """fp32 causal attention per request from vLLM's fields; returns (out, max |V| used)."""
    import torch

    head_size = query.shape[-1]
    k_cache, v_cache = kv_views(kv_cache, head_size)
    page = k_cache.shape[1]
    qsl = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    out = torch.zeros(qsl[-1], *query.shape[1:], dtype=torch.float32, device=query.device)
    max_v = 0.0
    for r, n_kv in enumerate(seq_lens):
        q0, q1 = qsl[r], qsl[r + 1]
        if q1 == q0 or n_kv == 0:
            continue
        pages = metadata.block_table[r, : math.ceil(n_kv / page)].long()
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n_kv].float()
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n_kv].float()
        group = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        q = query[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(q1 - q0, device=q.device)[:, None] + (n_kv - (q1 - q0))
        scores = scores.masked_fill(torch.arange(n_kv, device=q.device)[None, :] > q_pos, -math.inf)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        max_v = max(max_v, v.abs().max().item())
    return out, max_v


def install_probes(model):
    from vllm.model_executor.layers.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for index, layer in enumerate(layers):
        impl = layer.impl
        original = impl.forward

        def probed(lyr, query, key, value, kv_cache, attn_metadata, output, *rest, _i=index, _f=original, **kw):
            result = _f(lyr, query, key, value, kv_cache, attn_metadata, output, *rest, **kw)
            if PROBE.active and attn_metadata is not None:
                PROBE.record(_i, query, kv_cache, attn_metadata, output, lyr.impl.scale)
            return result

        impl.forward = probed
    return len(layers)


def reinit_weights(model, seed=1234):
    """Deterministic weights at a working scale (same values in every child on one GPU)."""
    import torch

    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            elif "embed_tokens" in name:
                p.uniform_(-math.sqrt(3.0), math.sqrt(3.0), generator=gen)  # std 1
            else:
                gain = 1.5 if "qkv_proj" in name else 4.0 if "lm_head" in name else 1.0
                bound = gain * math.sqrt(3.0 / p.shape[-1])  # std gain / sqrt(fan_in)
                p.uniform_(-bound, bound, generator=gen)
            count += 1
    return count


def prompts_for(args, vocab_size):
    gen_state = 12345
    prompts = []
    for i in range(args.num_prompts):
        length = max(4, args.prompt_len - 5 * i)
        ids = []
        for _ in range(length):
            gen_state = (gen_state * 1103515245 + 12345) % 2**31
            ids.append(1000 + gen_state % min(vocab_size - 1000, 30000))
        prompts.append(ids)
    return prompts


def sampled_logprob(position_logprobs, token):
    entry = position_logprobs[token]
    return float(entry.logprob)


def child(args) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process, for probes
    from importlib.metadata import entry_points

    if not any(ep.name == "engine_backend" for ep in entry_points(group="vllm.general_plugins")):
        from engine_backend.adapters.vllm.plugin import register

        print("engine_backend entry point not installed: registering the plugin in-process", flush=True)
        register()
    import torch
    from vllm import LLM, SamplingParams

    config = CONFIGS[args.child]
    llm_kwargs = dict(
        model=args.model_dir,
        load_format="dummy",
        attention_backend=config["backend"],
        dtype="bfloat16",
        seed=0,
        max_model_len=2048,
        max_num_seqs=max(args.num_prompts, 8),
        enable_prefix_caching=False,  # re-scoring must recompute, not reuse, the KV
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.eager,
    )
    if not args.eager:
        llm_kwargs["compilation_config"] = {"cudagraph_capture_sizes": CAPTURE_SIZES}
    if args.num_layers:
        llm_kwargs["hf_overrides"] = {"num_hidden_layers": args.num_layers}
    llm = LLM(**llm_kwargs)
    result = {"backend": config["backend"], "fault": config["fault"]}

    # Smoke: the offline engine generates with its dummy weights.
    smoke_params = SamplingParams(max_tokens=16, temperature=0)
    smoke = llm.generate(["The capital of France is", "def fibonacci(n):"], smoke_params)
    result["smoke_tokens"] = [len(o.outputs[0].token_ids) for o in smoke]
    print(f"smoke generation: {[o.outputs[0].text for o in smoke]!r}", flush=True)

    result["reinit_params"] = llm.apply_model(reinit_weights)[0]
    result["attention_layers"] = llm.apply_model(install_probes)[0]
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = prompts_for(args, vocab)

    # Generation: greedy, requests of different lengths so the decode batch shrinks into the
    # captured graph sizes; every call the probe sees is checked against the oracle.
    params = [
        SamplingParams(temperature=0, max_tokens=2 + 3 * i, ignore_eos=True, logprobs=0)
        for i in range(args.num_prompts)
    ]
    PROBE.active = True
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    generated = [list(o.outputs[0].token_ids) for o in outputs]
    sampled = [
        [sampled_logprob(lp, t) for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs
    ]

    # Re-score every prompt + generation in one eager prefill.
    rescore = llm.generate(
        [{"prompt_token_ids": p + g} for p, g in zip(prompts, generated)],
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    PROBE.active = False
    deviations = []
    for p, g, s, o in zip(prompts, generated, sampled, rescore):
        for j, (token, logprob) in enumerate(zip(g, s)):
            rescored = sampled_logprob(o.prompt_logprobs[len(p) + j], token)
            deviations.append(abs(rescored - logprob))

    result.update(
        generated=generated,
        rescore_deviation=max(deviations) if deviations else 0.0,
        oracle_calls=PROBE.calls,
        layer0_first=PROBE.layer0_first,
        eager=args.eager,
    )
    torch.save(result, args.out)
    return 0


# =============================================================================== verdicts
def oracle_verdict(run):
    ratios = [err / (ORACLE_TOL * max_v) for _, tokens, err, max_v in run["oracle_calls"] if tokens and max_v > 0]
    worst = max(ratios) if ratios else float("nan")
    return bool(ratios) and worst <= 1.0, f"{len(ratios)} calls, worst error = {worst:.3g} x tolerance"


def cross_verdict(a, b):
    (out_a, v_a), (out_b, v_b) = a["layer0_first"], b["layer0_first"]
    if out_a.shape != out_b.shape:
        return False, f"different first steps: {tuple(out_a.shape)} vs {tuple(out_b.shape)}"
    ratio = (out_a - out_b).abs().max().item() / (CROSS_TOL * max(v_a, v_b))
    return ratio <= 1.0, f"layer 0, {out_a.shape[0]} tokens: max difference = {ratio:.3g} x tolerance"


def summarize(results, args) -> int:
    checks = []

    def check(name, ok, detail):
        checks.append(ok)
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    for name in args.configs:
        if name not in results:
            check(f"run {name}", False, "the child process failed (see its log above)")
    custom, flash, fault = (results.get(n) for n in ("custom", "flash", "fault"))
    if custom:
        check("smoke: CUSTOM generates", all(n > 0 for n in custom["smoke_tokens"]), f"tokens {custom['smoke_tokens']}")
        check("oracle: CUSTOM", *oracle_verdict(custom))
    if flash:
        check("oracle calibration: FLASH_ATTN passes the same oracle", *oracle_verdict(flash))
    if custom and flash:
        check("cross-backend: CUSTOM vs FLASH_ATTN", *cross_verdict(custom, flash))
        same = sum(a == b for a, b in zip(custom["generated"], flash["generated"]))
        print(f"[info] identical greedy generations CUSTOM vs FLASH_ATTN: {same}/{len(custom['generated'])}")
        if not custom["eager"]:
            limit = max(RESCORE_FLOOR, 4 * flash["rescore_deviation"])
            check(
                "CUDA graphs: decode replays agree with eager re-scoring",
                custom["rescore_deviation"] <= limit,
                f"max |logprob difference| CUSTOM {custom['rescore_deviation']:.3g}, "
                f"FLASH_ATTN {flash['rescore_deviation']:.3g}, limit {limit:.3g}",
            )
    if fault:
        ok, detail = oracle_verdict(fault)
        check(f"fault {FAULT} is caught by the oracle", not ok, detail)
        if flash:
            ok, detail = cross_verdict(fault, flash)
            check(f"fault {FAULT} is caught by the cross-backend check", not ok, detail)
    passed = bool(checks) and all(checks)
    print(f"SUMMARY: {'PASS' if passed else 'FAIL'} ({sum(checks)}/{len(checks)} checks passed)", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
