"""SGLang extend (prefill) steps as a ShareGPT serving run sees them, one layer's attention: ours vs
SGLang's own Triton extend kernel and FlashInfer's paged prefill, on SGLang's page-size-1 KV pool.

    python benchmarks/bench_extend.py [--peers sglang_triton,flashinfer] [--out results.json]

Why: in the serving runs, SGLang with our backend shows a larger TTFT and P99 ITL than with its
``triton`` backend while its decode steps are close, so the extend step is the suspect. Under
SGLang's prefill CUDA graphs (``breakable``, the default) attention runs eagerly between captured
segments, so each layer costs the host time of the attention call as well as its GPU time. Each
case is timed three ways:

* GPU: CUDA events around one launch, median, L2 flushed before each (``benchmarks.timing``);
* host: wall time of one call on the CPU while the GPU is held busy (``torch.cuda._sleep``), so no
  call waits for the device: the Python and launch cost alone. A call that synchronised with the
  device would wait out the hold and show it (the ``held`` flag says whether the hold outlasted
  the calls);
* ours' per-step planning, which SGLang runs once per step, not per layer: the adapter's
  ``extend_layout`` (SGLang token table -> BSR) plus ``BatchPrefill.plan``, host and GPU.

Calls are made the way each backend makes them: ours through ``BatchPrefill.run`` behind
``torch.compiler.disable`` (as the adapter does), SGLang's ``extend_attention_fwd`` behind
``torch.compiler.disable`` with the new tokens' K/V contiguous and the cached prefix read through
int64 slot ids (its ``forward_extend``). SGLang's own per-step metadata is not timed here.
Llama-3-8B attention shape (32 query heads, 8 KV heads, head dim 128, bf16); the ShareGPT slice of
the serving runs has 96 prompt tokens per request on average.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import time_cuda  # noqa: E402
from engine_backend import reference  # noqa: E402
from engine_backend.adapters.sglang.layout import extend_layout  # noqa: E402
from engine_backend.prefill import BatchPrefill  # noqa: E402

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
# (name, new tokens per request, cached prefix tokens per request)
CASES = [
    ("1x96", [96], [0]),
    ("2x96", [96] * 2, [0] * 2),
    ("4x128", [128] * 4, [0] * 4),
    ("8x96", [96] * 8, [0] * 8),
    ("1x512", [512], [0]),
    ("6 ragged 30-700", [30, 60, 120, 250, 400, 700], [0] * 6),
    ("2x64 onto 600 cached", [64] * 2, [600] * 2),
]
PEERS = ("sglang_triton", "flashinfer")
HOLD_CYCLES = 200_000_000  # GPU clock cycles the device is held busy while host time is measured (~0.1 s)


class ExtendCase:
    """One extend step in SGLang's terms: a token table over a page-size-1 pool holding every
    request's prefix and new tokens (slots handed out in order, as a fresh allocator does; slot 0
    is SGLang's padding slot), and the step's queries and new K/V."""

    def __init__(self, new: list[int], prefix: list[int]):
        rows = len(new)
        seq = [p + n for p, n in zip(prefix, new)]
        slots = 1 + sum(seq)
        self.k_pool = torch.randn(slots, HKV, D, dtype=DTYPE, device="cuda")
        self.v_pool = torch.randn_like(self.k_pool)
        self.req_to_token = torch.zeros(rows, max(seq), dtype=torch.int32, device="cuda")
        at = 1
        for r, n in enumerate(seq):
            self.req_to_token[r, :n] = torch.arange(at, at + n, dtype=torch.int32, device="cuda")
            at += n
        self.req_pool_indices = torch.arange(rows, dtype=torch.int64, device="cuda")
        self.seq_lens = torch.tensor(seq, dtype=torch.int64, device="cuda")
        self.seq_lens_cpu = torch.tensor(seq, dtype=torch.int64)
        self.extend_seq_lens = torch.tensor(new, dtype=torch.int32, device="cuda")
        self.new, self.prefix = new, prefix
        self.num_tokens = sum(new)
        self.q = torch.randn(self.num_tokens, HQ, D, dtype=DTYPE, device="cuda")
        new_slots = torch.cat([self.req_to_token[r, p : p + n].long() for r, (p, n) in enumerate(zip(prefix, new))])
        self.k_new, self.v_new = self.k_pool[new_slots].contiguous(), self.v_pool[new_slots].contiguous()

    def layout(self):
        return extend_layout(self.req_to_token, self.req_pool_indices, self.seq_lens, self.extend_seq_lens,
                             self.seq_lens_cpu, self.num_tokens, 1)

    def pages(self):
        return self.k_pool.unsqueeze(1), self.v_pool.unsqueeze(1)  # the adapter's paged_kv_view at page 1


def host_us(fn, calls: int) -> tuple[float, bool]:
    """Host microseconds per ``fn()`` while the GPU is held busy, and whether the hold outlasted
    the calls (if not, some calls may have waited for the device and the figure is an upper bound)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(HOLD_CYCLES)
    released = torch.cuda.Event()
    released.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    held = not released.query()
    torch.cuda.synchronize()
    return elapsed / calls * 1e6, held


def measure(fn, calls: int = 50) -> dict:
    host, held = host_us(fn, calls)
    return {"gpu_us": time_cuda(fn).median_ms * 1e3, "host_us": host, "held": held}


def bench_ours(case: ExtendCase) -> tuple[dict, torch.Tensor, object]:
    layout = case.layout()
    pre = BatchPrefill(HQ, HKV, D, 1, dtype=DTYPE, max_batch_size=max(256, len(case.new)),
                       max_num_tokens=max(16384, case.num_tokens))
    k_pages, v_pages = case.pages()
    run = torch.compiler.disable(pre.run)  # as the adapter calls it: output allocated per call
    pre.plan(layout.kv, num_tokens=case.num_tokens)
    result = {"ours": measure(lambda: run(case.q, k_pages, v_pages)),
              "ours_tile": f"{pre.tile.warps} warps x {pre.tile.kv_tile} keys"}

    def plan():
        pre.plan(case.layout().kv, num_tokens=case.num_tokens)

    # The plan launches ~20 small kernels: fewer calls keep the launch queue from filling during the hold.
    plan_host, plan_held = host_us(plan, calls=20)
    result["ours_plan"] = {"gpu_us": time_cuda(plan, flush=False).median_ms * 1e3, "host_us": plan_host,
                           "held": plan_held}
    pre.plan(layout.kv, num_tokens=case.num_tokens)
    out = run(case.q, k_pages, v_pages)
    torch.cuda.synchronize()
    return result, out, layout


def bench_peer(name: str, case: ExtendCase, layout) -> tuple[dict, torch.Tensor]:
    from benchmarks import engine_peers, peers

    if name == "sglang_triton":
        peer = engine_peers.sglang_triton_extend_peer(case.q, case.k_new, case.v_new, case.k_pool, case.v_pool,
                                                      case.req_to_token, case.prefix, case.new)
    elif name == "flashinfer":
        k_pages, v_pages = case.pages()
        peer = peers.flashinfer_paged_prefill_peer(case.q, k_pages, v_pages, layout.kv, backend="fa2")
    else:
        raise ValueError(f"unknown peer {name!r}; known: {list(PEERS)}")
    if peer.note:
        print(f"[{peer.name}] {peer.note}")
    return measure(peer.run), peer.output()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {list(PEERS)}")
    if names and "flashinfer" in names:
        from benchmarks import peers

        peers.setup_flashinfer_env()
    torch.manual_seed(0)
    rows = []
    for name, new, prefix in CASES:
        case = ExtendCase(new, prefix)
        ours, out, layout = bench_ours(case)
        ref, _ = reference.attention(case.q, *case.pages(), layout.kv, causal=True, sm_scale=1 / math.sqrt(D))
        row = {"case": name, "new_tokens": case.num_tokens, **ours, "ours_rel_err": rel_err(out, ref)}
        for peer in names:
            try:
                timing, peer_out = bench_peer(peer, case, layout)
                row[peer] = timing
                row[f"{peer}_rel_err"] = rel_err(peer_out, ref)
            except Exception as e:  # noqa: BLE001 - a missing peer must not hide our numbers
                row[f"{peer}_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    print_table(rows, names)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


def print_table(rows: list[dict], names: list[str]) -> None:
    print(f"device: {torch.cuda.get_device_name()}; one layer's extend attention, µs (GPU / host per call)")
    kernels = ["ours"] + names
    print("| case | " + " | ".join(f"{k} GPU | {k} host" for k in kernels) + " | ours plan GPU | ours plan host |")
    print("|---|" + "---|---|" * len(kernels) + "---|---|")
    for r in rows:
        cells = []
        for k in kernels:
            m = r.get(k)
            cells += [f"{m['gpu_us']:.1f}", f"{m['host_us']:.1f}" + ("" if m["held"] else " (!)")] if m else ["n/a"] * 2
        plan = r["ours_plan"]
        print(f"| {r['case']} | " + " | ".join(cells) + f" | {plan['gpu_us']:.1f} | {plan['host_us']:.1f}"
              + ("" if plan["held"] else " (!)") + " |")
    print("(!): the GPU hold ended before the calls did; that host figure may include waiting for the device")
    for r in rows:
        extras = {k: v for k, v in r.items() if k.endswith(("_rel_err", "_error", "_tile"))}
        print(f"  {r['case']}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in extras.items()))


if __name__ == "__main__":
    main()
