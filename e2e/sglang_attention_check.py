"""End-to-end check of engine_backend inside SGLang 0.5.16 (GPU): a check that can fail.

    python e2e/sglang_attention_check.py e2e/models/llama3-8b-shape [--layers 4] [--configs ...]

Each configuration runs in its own child process (SGLang spawns its scheduler there; the
``__main__`` guard below keeps the spawn from re-running the parent):

* ``flashinfer``: ``sglang.Engine(model_path=DIR, load_format="dummy", attention_backend=
  "flashinfer", grammar_backend="none")``, the reference;
* ``triton``: the same with SGLang's Triton backend: calibrates the tolerance (two correct
  bf16 kernels must agree within it, or the check is not trustworthy and FAILS);
* ``ours`` / ``ours_paged``: ``attention_backend="engine_backend"`` with page size 1 (radix
  cache default) / 16;
* ``fault``: ``ours`` with ``ENGINE_BACKEND_FAULT=drop_last_kv`` (every request attends to
  one KV token fewer): it MUST fail the comparison, or the check proves nothing.

Every child first smoke-generates text with SGLang's dummy weights. Those weights are uniform
in +-1e-3, so attention is uniform and every backend produces the same tokens whatever it
computes; the child therefore re-initialises the attention weights deterministically
(``Engine.update_weights_from_tensor``) at a working scale: unit-RMS normalised activations,
q/k/v components of unit variance, each KV head's keys half-aligned with its first query
head (a token's score against itself ~5.7 above the others, so attention is sharp and
dropping a token shows), logits of std ~4. The model is cut to ``--layers`` layers
(``json_model_override_args``); the attention shape stays Llama-3-8B's (32 query heads,
8 KV heads, head dim 128).

The workload, identical in every child, covers what the backend translates: long prompts
split by chunked prefill (extend with prefix), a second wave that hits the radix cache on
the first wave's prompts (SGLang reuses a cached prefix only up to ``logprob_start_len``, so
that wave asks for its new tails' logprobs only), MIXED batches (``enable_mixed_chunk``),
decode batches replayed as CUDA graphs (<= 16 requests) and a 24-request wave decoded
eagerly. Compared against the reference, per token, in natural-log probability:

* prompt tokens (teacher-forced: same tokens everywhere) and
* generated tokens, up to the first position where greedy sampling picks a different token
  (allowed only at a near-tie, and at least half of all decode steps must be compared).

Tolerance (nats): mean |d logprob| <= 0.05 and max <= 0.3. A correct bf16 attention kernel
with fp32 accumulation differs from another by about one bf16 unit (2^-8 relative) in its
output; through a few layers that is ~0.4% of the hidden state, i.e. ~0.015 on logits of
std ~4 (typical |d logprob| ~0.02, tails ~0.1). A CPU simulation of this very model
(these weights, 4 layers, 320 tokens; one attention rounding its probabilities to bf16
before P.V, the other not) gives mean 0.014 / max 0.05 between the two correct versions and
mean 1.8 nats (1.6 past the 50th token) with the newest KV token dropped, and greedy
argmax agreement of 99.4%. The ``triton`` run measures the real spread and must pass the
same bounds.

Prints one PASS/FAIL line per check and a summary; exit status 0 only on PASS. Needs the
engine_backend distribution installed (its ``sglang.srt.plugins`` entry point is how each
SGLang scheduler process finds the backend), e.g. ``pip install --target SITE`` and
``PYTHONPATH=SITE``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from engine_backend.adapters.common.faults import DROP_LAST_KV as FAULT
from engine_backend.adapters.common.faults import FAULT_ENV

MEAN_TOL = 0.05  # nats, mean |d logprob| over compared tokens
MAX_TOL = 0.3  # nats, any single token
MIN_DECODE_COVERAGE = 0.5  # fraction of decode steps compared before greedy paths part
CONFIGS = {
    "flashinfer": dict(backend="flashinfer", page_size=1, fault=None),
    "triton": dict(backend="triton", page_size=1, fault=None),
    "ours": dict(backend="engine_backend", page_size=1, fault=None),
    "ours_paged": dict(backend="engine_backend", page_size=16, fault=None),
    "fault": dict(backend="engine_backend", page_size=1, fault=FAULT),
}
REFERENCE = "flashinfer"
SEED = 20251123
ALIGN = 0.5  # share of a KV head's keys aligned with its first query head (score vs itself)
LOGIT_GAIN = 100.0  # final norm weight: logits of std ~4 with SGLang's dummy lm_head


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model directory (config.json + tokenizer), e.g. e2e/models/llama3-8b-shape")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (json_model_override_args)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chunked-prefill-size", type=int, default=256)
    p.add_argument("--cuda-graph-max-bs", type=int, default=16)
    p.add_argument("--mem-fraction-static", type=float, default=0.6)
    p.add_argument("--child-timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument(
        "--results",
        help="folder keeping each configuration's results (JSON) across invocations: configurations "
        "already there are reused, so a long check can be split over several commands",
    )
    p.add_argument("--rerun", action="store_true", help="run the configurations even if --results has them")
    p.add_argument(
        "--parallel",
        action="store_true",
        help="run the configurations' engines side by side on the one GPU, each with a KV pool capped by "
        "--max-total-tokens (SGLang sizes its pool from the memory free at start, which the others share)",
    )
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size of each engine (tokens)")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ==================================================================================== workload
def make_waves(vocab_size: int):
    """(name, prompts, logprob_start_lens) per wave, identical in every child.

    SGLang reuses a cached prefix only up to a request's ``logprob_start_len`` (it cannot
    return logprobs of tokens it does not recompute), so the radix-hit wave asks for the
    logprobs of the new tails only: exactly the tokens computed as extend-with-prefix."""
    import torch

    gen = torch.Generator().manual_seed(SEED)

    def tokens(n):
        return torch.randint(1000, vocab_size - 1000, (n,), generator=gen).tolist()

    base_lens = [1, 7, 33, 128, 200, 517, 800, 1100]  # > chunk size: chunked prefill
    base = [tokens(n) for n in base_lens]
    heads = [p[: max(1, len(p) * 3 // 4)] for p in base]
    hits = [h + tokens(t) for h, t in zip(heads, [3, 9, 40, 5, 130, 70, 300, 16])]
    crowd = [tokens(3 + (17 * i) % 60) for i in range(24)]  # decode batch above the graph sizes
    return [
        ("base", base, [0] * len(base)),
        ("radix_hits", hits, [len(h) for h in heads]),
        ("crowd", crowd, [0] * len(crowd)),
    ]


def attention_weights(config: dict, layers: int, dummy_rms: float):
    """Deterministic re-initialisation of the attention path (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    group = heads // kv_heads

    def gaussian(rows, cols):
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    # Layer 0 normalises the dummy embeddings (RMS dummy_rms, far below RMSNorm's eps): undo
    # the eps damping so its input has unit RMS like every later layer's.
    eps = config.get("rms_norm_eps", 1e-5)
    first_gain = math.sqrt(dummy_rms**2 + eps) / dummy_rms
    named = []
    for i in range(layers):
        wq = gaussian(heads * head_dim, hidden)
        leaders = wq.view(heads, head_dim, hidden)[::group].reshape(kv_heads * head_dim, hidden)
        wk = ALIGN * leaders + math.sqrt(1 - ALIGN**2) * gaussian(kv_heads * head_dim, hidden)
        prefix = f"model.layers.{i}"
        named += [
            (f"{prefix}.input_layernorm.weight", torch.full((hidden,), first_gain if i == 0 else 1.0)),
            (f"{prefix}.self_attn.q_proj.weight", wq),
            (f"{prefix}.self_attn.k_proj.weight", wk),
            (f"{prefix}.self_attn.v_proj.weight", gaussian(kv_heads * head_dim, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", gaussian(hidden, heads * head_dim)),
        ]
    named.append(("model.norm.weight", torch.full((hidden,), LOGIT_GAIN)))
    return [(name, t.to(torch.bfloat16).contiguous()) for name, t in named]


# ==================================================================================== child
def child(args) -> int:
    import sglang
    import torch

    spec = CONFIGS[args.child]
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    engine = sglang.Engine(
        model_path=args.model,
        load_format="dummy",
        attention_backend=spec["backend"],
        grammar_backend="none",
        page_size=spec["page_size"],
        json_model_override_args=json.dumps({"num_hidden_layers": args.layers}),
        chunked_prefill_size=args.chunked_prefill_size,
        enable_mixed_chunk=True,
        cuda_graph_max_bs_decode=args.cuda_graph_max_bs,
        mem_fraction_static=args.mem_fraction_static,
        random_seed=0,
        log_level="warning",
        port=30000 + 40 * list(CONFIGS).index(args.child),  # distinct ports: engines may run side by side
        **({"max_total_tokens": args.max_total_tokens} if args.max_total_tokens else {}),
    )
    try:
        info = engine.get_server_info()
        keys = ("attention_backend", "prefill_attention_backend", "decode_attention_backend", "page_size")
        backends = {k: info.get(k) for k in keys}
        smoke = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 16})
        # SGLang's dummy init draws every parameter from the same uniform range: measure it on a
        # small one rather than assume it.
        norm0 = engine.get_weights_by_name("model.layers.0.input_layernorm.weight", truncate_size=config["hidden_size"])
        norm0 = torch.tensor(norm0)
        dummy_rms = float(norm0.float().pow(2).mean().sqrt())
        update_weights(engine, attention_weights(config, args.layers, dummy_rms))
        check = torch.tensor(engine.get_weights_by_name("model.norm.weight", truncate_size=4)).float()
        if not torch.allclose(check, torch.full_like(check, LOGIT_GAIN)):
            raise RuntimeError(f"weight update did not take effect: model.norm.weight[:4] = {check.tolist()}")
        waves = {}
        sampling = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
        for name, prompts, starts in make_waves(config["vocab_size"]):
            outs = engine.generate(
                input_ids=prompts, sampling_params=sampling, return_logprob=True, logprob_start_len=starts
            )
            waves[name] = [summarize(o) for o in outs]
    finally:
        engine.shutdown()
    result = dict(
        config=args.child,
        workload=workload_key(args),
        backends=backends,
        smoke_text=smoke["text"],
        dummy_rms=dummy_rms,
        waves=waves,
    )
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def update_weights(engine, named) -> None:
    """One tensor per call: CPU tensors travel through shared memory (/dev/shm), which
    containers often keep small; the cache is flushed once, after the last."""
    for i, (name, tensor) in enumerate(named):
        success, message = engine.update_weights_from_tensor([(name, tensor)], flush_cache=i == len(named) - 1)
        if not success:
            raise RuntimeError(f"update_weights_from_tensor({name}) failed: {message}")


def workload_key(args) -> dict:
    """What must be equal for two runs to be comparable."""
    keys = ("layers", "max_new_tokens", "chunked_prefill_size", "cuda_graph_max_bs")
    return {k: getattr(args, k) for k in keys} | {"model": os.path.abspath(args.model), "seed": SEED}


def summarize(output: dict) -> dict:
    meta = output["meta_info"]
    # A prompt's first token has no logprob (None); the others are teacher-forced.
    prompt = [lp for lp, _, _ in meta["input_token_logprobs"] if lp is not None]
    return dict(
        prompt_logprobs=prompt,
        output_ids=[tid for _, tid, _ in meta["output_token_logprobs"]],
        output_logprobs=[lp for lp, _, _ in meta["output_token_logprobs"]],
    )


# ==================================================================================== compare
class Deviation:
    def __init__(self):
        self.values, self.decode_compared, self.decode_total, self.bad_divergences = [], 0, 0, 0
        self.shape_mismatches = 0  # requests whose token counts differ: not comparable

    def add_prompt(self, ref, ours):
        a, b = ref["prompt_logprobs"], ours["prompt_logprobs"]
        self.shape_mismatches += len(a) != len(b) or len(ref["output_ids"]) != len(ours["output_ids"])
        self.values += [abs(x - y) for x, y in zip(a, b)]

    def add_decode(self, ref, ours):
        self.decode_total += len(ref["output_ids"])
        for t, (ra, oa) in enumerate(zip(ref["output_ids"], ours["output_ids"])):
            d = abs(ref["output_logprobs"][t] - ours["output_logprobs"][t])
            if ra != oa:  # greedy paths part: fine only at a near-tie of the two top tokens
                self.bad_divergences += d > MAX_TOL
                break
            self.values.append(d)
            self.decode_compared += 1

    @property
    def mean(self):
        return sum(self.values) / max(1, len(self.values))

    @property
    def max(self):
        return max(self.values, default=0.0)

    @property
    def coverage(self):
        return self.decode_compared / max(1, self.decode_total)

    def within(self) -> bool:
        return (
            self.mean <= MEAN_TOL
            and self.max <= MAX_TOL
            and self.bad_divergences == 0
            and self.shape_mismatches == 0
            and self.coverage >= MIN_DECODE_COVERAGE
        )

    def describe(self) -> str:
        return (
            f"mean {self.mean:.4f} max {self.max:.4f} nats over {len(self.values)} tokens; "
            f"decode steps compared {self.decode_compared}/{self.decode_total}; "
            f"bad divergences {self.bad_divergences}; "
            f"requests of differing length {self.shape_mismatches}"
        )


def deviation(ref: dict, ours: dict) -> Deviation:
    dev = Deviation()
    for wave, ref_outs in ref["waves"].items():
        for r, o in zip(ref_outs, ours["waves"][wave]):
            dev.add_prompt(r, o)
            dev.add_decode(r, o)
    return dev


def verdicts(results: dict) -> list[tuple[str, bool, str]]:
    lines = []
    workloads = {json.dumps(res["workload"], sort_keys=True) for res in results.values()}
    if len(workloads) > 1:
        lines.append(("all runs share one workload", False, f"differing settings: {sorted(workloads)}"))
    for name, res in results.items():
        used = res["backends"]
        expected = CONFIGS[name]["backend"]
        ok = used.get("attention_backend") == expected or (
            used.get("prefill_attention_backend") == expected and used.get("decode_attention_backend") == expected
        )
        ran = bool(res["smoke_text"]) and ok
        detail = f"server info {used}; smoke text {res['smoke_text']!r}"
        lines.append((f"{name}: runs with attention backend {expected}", ran, detail))
    ref = results.get(REFERENCE)
    if ref is None:
        lines.append((f"reference {REFERENCE} ran", False, "no results"))
        return lines
    for name, res in results.items():
        if name == REFERENCE:
            continue
        dev = deviation(ref, res)
        if name == "fault":
            lines.append(("fault run is caught (must differ beyond tolerance)", not dev.within(), dev.describe()))
        elif name == "triton":
            lines.append(("calibration: triton agrees with flashinfer within tolerance", dev.within(), dev.describe()))
        else:
            lines.append((f"{name} agrees with {REFERENCE} within tolerance", dev.within(), dev.describe()))
    for name in CONFIGS:
        if name not in results:
            lines.append((f"{name} was run", False, "no results (every configuration gates PASS)"))
    return lines


# ==================================================================================== parent
def entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "engine_backend" for ep in entry_points(group="sglang.srt.plugins"))


def start_child(args, name, out, extra=()) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if CONFIGS[name]["fault"]:
        env[FAULT_ENV] = CONFIGS[name]["fault"]
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], *extra, "--child", name, "--out", out]
    print(f"=== {name}: {CONFIGS[name]}", flush=True)
    return subprocess.Popen(cmd, env=env)


def wait_child(args, name, out, proc: subprocess.Popen, start: float) -> bool:
    try:
        code = proc.wait(timeout=max(1.0, args.child_timeout - (time.time() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    print(f"=== {name}: exit {code} after {time.time() - start:.0f} s", flush=True)
    return code == 0 and os.path.exists(out)


def run_children(args, todo: dict[str, str]) -> list[str]:
    """Run the configurations' children (one after another, or side by side with --parallel);
    returns the names of those that did not complete."""
    failed = []
    if args.parallel:
        extra = ["--max-total-tokens", str(args.max_total_tokens or 32768), "--mem-fraction-static", "0.85"]
        start = time.time()
        procs = {name: start_child(args, name, out, extra) for name, out in todo.items()}
        failed = [name for name, proc in procs.items() if not wait_child(args, name, todo[name], proc, start)]
    else:
        for name, out in todo.items():
            start = time.time()
            if not wait_child(args, name, out, start_child(args, name, out), start):
                failed.append(name)
    return failed


def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    if not entry_point_installed():
        print("FAIL: the engine_backend entry point (group sglang.srt.plugins) is not installed; SGLang's "
              "scheduler processes could not load the backend. Install the distribution (pip install ...).")
        return 1
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.results or tmp
        os.makedirs(folder, exist_ok=True)
        todo = {}
        for name in dict.fromkeys([REFERENCE, *args.configs]):
            out = os.path.join(folder, f"{name}.json")
            if args.results and os.path.exists(out) and not args.rerun:
                print(f"=== {name}: reusing {out}", flush=True)
            else:
                todo[name] = out
        for name in run_children(args, todo):
            lines.append((f"{name}: child run completed", False, "see its log above"))
        results = {}
        for name in CONFIGS:
            path = os.path.join(folder, f"{name}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[name] = json.load(f)
    lines += verdicts(results)
    print(
        f"\n==== results (tolerance: mean <= {MEAN_TOL} and max <= {MAX_TOL} nats, "
        f"decode coverage >= {MIN_DECODE_COVERAGE:.0%})"
    )
    for title, ok, detail in lines:
        print(f"{'PASS' if ok else 'FAIL'}  {title}: {detail}")
    passed = all(ok for _, ok, _ in lines)
    print(f"\nSUMMARY: {'PASS' if passed else 'FAIL'} ({sum(ok for _, ok, _ in lines)}/{len(lines)} checks)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
