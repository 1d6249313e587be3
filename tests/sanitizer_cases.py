"""Small cases of every kernel, run under compute-sanitizer (memcheck, racecheck, synccheck):

    compute-sanitizer --tool memcheck python tests/sanitizer_cases.py [token_table]

Each case also checks its result against the reference, so a pass means "clean and right".
``token_table`` runs only the token-table case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_backend import BSR, reference  # noqa: E402
from engine_backend.decode import BatchDecode  # noqa: E402
from engine_backend.merge import merge_state, merge_states  # noqa: E402
from engine_backend.prefill import BatchPrefill  # noqa: E402
from paged_inputs import TOL, decode_batch, rel_err  # noqa: E402
from test_format import token_table_case  # noqa: E402
from test_prefill import like, other_mainloop_tiles, paged_batch  # noqa: E402


def token_table_failures() -> list[str]:
    """SGLang's token table -> BSR on the device (two scan chunks, a zeroed tail) vs the torch ops."""
    seq_lens = [0, 5, 130, 16] * 300
    table, req = token_table_case(seq_lens, 16, 136, pool_rows=len(seq_lens) + 2)
    capacity = sum(-(-n // 16) for n in seq_lens) + 9
    args = (table, req, torch.tensor(seq_lens))
    gpu = BSR.from_token_table(*(t.cuda() for t in args), page_size=16, capacity=capacity)
    cpu = BSR.from_token_table(*args, page_size=16, capacity=capacity)
    same = all(torch.equal(getattr(cpu, f), getattr(gpu, f).cpu()) for f in ("indptr", "indices", "kv_lens"))
    return [] if same else ["token_table"]


def main() -> int:
    torch.manual_seed(0)
    failures = token_table_failures()
    if sys.argv[1:] == ["token_table"]:
        print("sanitizer cases (token_table):", "FAIL" if failures else "all match the reference")
        return 1 if failures else 0
    va, vb = torch.randn(2, 3, 4, 128, dtype=torch.bfloat16, device="cuda")
    la, lb = torch.randn(2, 3, 4, device="cuda")
    la[0, 0] = -float("inf")
    out, lse = merge_state(va, la, vb, lb)
    ref, ref_lse = reference.merge_state(va, la, vb, lb)
    if rel_err(out, ref) > TOL[torch.bfloat16]:
        failures.append("merge_state")
    indptr = torch.tensor([0, 2, 2, 3], dtype=torch.int32, device="cuda")
    merge_states(torch.cat([va, vb[:1]]), torch.cat([la, lb[:1]]), indptr)

    q, k, v, bsr = decode_batch([1, 40, 300, 0], 16, 8, 2, 128, torch.bfloat16)
    dec = BatchDecode(8, 2, 128, 16, max_batch_size=4)
    dec.plan(bsr)
    out = dec.run(q, k, v)
    if rel_err(out, reference.attention(q, k, v, bsr)[0]) > TOL[torch.bfloat16]:
        failures.append("decode")

    q, k, v, bsr = paged_batch([3, 70], [40, 70], 16, 8, 2, 128, torch.bfloat16)
    pre = BatchPrefill(8, 2, 128, 16, max_batch_size=2, max_num_tokens=128)
    runs = [(pre, 0), (pre, None)]  # the short-query tile shape, then the long-query one
    runs += [(like(pre, tile), None) for tile in other_mainloop_tiles(pre)]  # on Hopper, the other mainloop too
    for pre, num_tokens in runs:
        pre.plan(bsr, num_tokens=num_tokens)
        out = pre.run(q, k, v)
        if rel_err(out, reference.attention(q, k, v, bsr, causal=True)[0]) > TOL[torch.bfloat16]:
            failures.append(f"prefill {pre.tile}")
    torch.cuda.synchronize()
    print("sanitizer cases:", "FAIL " + ", ".join(failures) if failures else "all match the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
