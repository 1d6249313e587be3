"""Plain-torch attention over a BSR KV cache: the ground truth for every kernel test.

Conventions shared with the kernels:

* ``q``: ``[total_q, Hq, D]`` packed by ``bsr.qo_indptr``; ``k_cache``/``v_cache``:
  ``[num_pages, page_size, Hkv, D]`` (any strides). Query head ``h`` reads KV head
  ``h // (Hq // Hkv)`` (GQA/MQA).
* Returns ``(out, lse)``: ``out`` in ``q``'s dtype, ``lse`` float32 ``[total_q, Hq]``, the
  natural-log log-sum-exp of the scores (after the variant; see ``variants``). A query
  that sees no key gets ``out = 0`` and ``lse = -inf``, which is exactly the identity of
  the state merge below.
* Arithmetic in float32 (float64 if the inputs are float64).
"""

from __future__ import annotations

import math

import torch

from .format import BSR
from .variants import DEFAULT, Variant


def _row_kv(cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[kv_len, H, D] tokens of one row, gathered from its pages."""
    return cache[pages.long()].reshape(-1, *cache.shape[2:])[:kv_len]


def _scores(
    q: torch.Tensor,  # [q_len, Hq, D] compute dtype
    k: torch.Tensor,  # [kv_len, Hq, D]
    kv_len: int,
    causal: bool,
    sm_scale: float,
    variant: Variant,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    q_len = q.shape[0]
    s = torch.einsum("qhd,khd->hqk", q, k) * sm_scale
    if variant.logits_soft_cap > 0:
        cap = variant.logits_soft_cap
        s = cap * torch.tanh(s / cap)
    q_pos = torch.arange(q_len, device=q.device) + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=q.device)
    dist = q_pos[:, None] - k_pos[None, :]  # [q, k]
    if variant.alibi:
        if alibi_slopes is None:
            raise ValueError("variant.alibi needs alibi_slopes")
        s = s - alibi_slopes.to(s.dtype)[:, None, None] * dist[None]
    keep = torch.ones_like(dist, dtype=torch.bool)
    if causal:
        keep &= dist >= 0
    if variant.window_left >= 0:
        keep &= dist <= variant.window_left
    return s.masked_fill(~keep[None], -math.inf)


def _softmax_state(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted sum and log-sum-exp; rows with every score -inf give (0, -inf)."""
    lse = torch.logsumexp(s, dim=-1)  # [h, q]
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    p = p.masked_fill(torch.isinf(lse)[..., None], 0.0)
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse.transpose(0, 1)


def _check_inputs(q, k_cache, v_cache, kv: BSR, variant: Variant, alibi_slopes) -> None:
    """The shapes ``attention`` reads by, which the kernels' ``run()`` checks as well: a mismatch
    would give an answer, just not the attention of these inputs."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q must be [tokens, Hq, D] and the caches [pages, page_size, Hkv, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    hq, hkv = q.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    if k_cache.shape[1:] != (kv.page_size, hkv, q.shape[2]) or v_cache.shape[1:3] != (kv.page_size, hkv):
        raise ValueError(f"the caches must be [pages, {kv.page_size} (the BSR's page size), Hkv, {q.shape[2]}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if kv.num_rows and q.shape[0] < int(kv.qo_indptr[-1]):
        raise ValueError(f"q has {q.shape[0]} rows but the BSR's queries number {int(kv.qo_indptr[-1])}")
    if alibi_slopes is not None and not variant.alibi:
        raise ValueError("alibi_slopes given to a variant without ALiBi (Variant(alibi=True) adds them)")


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv: BSR,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    variant: Variant = DEFAULT,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k_cache, v_cache, kv, variant, alibi_slopes)
    total_q, hq, d = q.shape
    group = hq // k_cache.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(total_q, hq, v_cache.shape[-1], dtype=compute, device=q.device)
    lse = torch.full((total_q, hq), -math.inf, dtype=compute, device=q.device)
    indptr, qo_indptr, kv_lens = kv.indptr.tolist(), kv.qo_indptr.tolist(), kv.kv_lens.tolist()
    for r in range(kv.num_rows):
        q0, q1, kv_len = qo_indptr[r], qo_indptr[r + 1], kv_lens[r]
        if q1 == q0 or kv_len == 0:
            continue
        pages = kv.indices[indptr[r] : indptr[r + 1]]
        k = _row_kv(k_cache, pages, kv_len).to(compute).repeat_interleave(group, dim=1)
        v = _row_kv(v_cache, pages, kv_len).to(compute).repeat_interleave(group, dim=1)
        s = _scores(q[q0:q1].to(compute), k, kv_len, causal, sm_scale, variant, alibi_slopes)
        out[q0:q1], lse[q0:q1] = _softmax_state(s, v)
    return out.to(q.dtype), lse.to(torch.float32 if compute == torch.float32 else compute)


def merge_state(
    v_a: torch.Tensor, lse_a: torch.Tensor, v_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_a, lse_a) ⊕ (V_b, lse_b): the attention state over the union of both key sets.

    ``v_*``: ``[N, H, D]``; ``lse_*``: ``[N, H]`` natural log. Associative and commutative;
    a state with ``lse = -inf`` (no keys) is the identity.
    """
    compute = torch.float64 if v_a.dtype == torch.float64 else torch.float32
    lse_a, lse_b = lse_a.to(compute), lse_b.to(compute)
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m_safe), torch.exp(lse_b - m_safe)
    total = w_a + w_b
    denom = torch.where(total > 0, total, torch.ones_like(total))
    # An empty state (w = 0) contributes nothing, whatever its values hold (even NaN).
    part_a = torch.where(w_a[..., None] > 0, v_a.to(compute) * w_a[..., None], 0.0)
    part_b = torch.where(w_b[..., None] > 0, v_b.to(compute) * w_b[..., None], 0.0)
    v = (part_a + part_b) / denom[..., None]
    lse = torch.where(total > 0, m_safe + torch.log(denom), torch.full_like(m, -math.inf))
    return v.to(v_a.dtype), lse.to(torch.float32 if compute == torch.float32 else compute)


def merge_states(v: torch.Tensor, lse: torch.Tensor, indptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n-way merge: output row i merges states ``indptr[i] : indptr[i + 1]`` of ``v``/``lse``
    (``[S, H, D]``/``[S, H]``). An empty range gives ``(0, -inf)``."""
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    bounds = indptr.tolist()
    n = len(bounds) - 1
    out = torch.zeros(n, *v.shape[1:], dtype=compute, device=v.device)
    out_lse = torch.full((n, v.shape[1]), -math.inf, dtype=compute, device=v.device)
    for i in range(n):
        for s in range(bounds[i], bounds[i + 1]):
            out[i : i + 1], out_lse[i : i + 1] = merge_state(
                out[i : i + 1], out_lse[i : i + 1], v[s : s + 1].to(compute), lse[s : s + 1].to(compute)
            )
    return out.to(v.dtype), out_lse.to(torch.float32 if compute == torch.float32 else compute)
