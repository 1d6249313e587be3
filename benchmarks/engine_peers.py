"""The engines' own decode kernels as measured peers, called the way their attention backends call them.

* ``vllm_fa3``: vLLM 0.26's FLASH_ATTN backend on Hopper: ``vllm.vllm_flash_attn.flash_attn_varlen_func``
  (FlashAttention 3) on the paged cache, with the ahead-of-time scheduler metadata and the split cap
  vLLM uses for decode batches under CUDA graphs (``flash_attn_max_num_splits_for_cuda_graph``, 32).
* ``sglang_triton``: SGLang 0.5.16's ``triton`` backend: ``decode_attention_fwd`` over a token-indexed
  cache (page size 1), with its per-batch KV-split count from ``get_num_kv_splits_triton`` and the
  default ``--triton-attention-num-kv-splits`` of 8 and programmatic dependent launch on sm_90+;
  ``sglang_triton_extend``: the same backend's prefill, ``extend_attention_fwd`` on the step's
  contiguous new K/V plus the cached prefix read through slot ids.

Each returns a ``peers.Peer`` (set-up done, ``run()`` only the attention launch) and is importable only
where that engine is installed: on the GPU host after its bundle is installed. ``sglang_triton`` needs
less: SGLang's Triton modules import only torch, triton, each other and small names of SGLang, so with
``ENGINE_BACKEND_SGLANG_WHEEL`` pointing at the ``sglang-0.5.16`` wheel they are loaded from its files,
unmodified, without installing SGLang (``sglang_triton_modules``); the peer's note says which ran.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import os
import sys
import tempfile
import types
import zipfile
from importlib import util

import torch

from benchmarks.peers import Peer

VLLM_CUDA_GRAPH_MAX_SPLITS = 32  # vLLM 0.26 AttentionConfig.flash_attn_max_num_splits_for_cuda_graph
SGLANG_MAX_KV_SPLITS = 8  # SGLang 0.5.16 ServerArgs.triton_attention_num_kv_splits (CUDA)


def vllm_fa3_decode_peer(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor) -> Peer:
    """One-token decode of ``q [B, Hq, D]`` over ``[pages, page_size, Hkv, D]`` caches."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    batch, num_qo_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    max_seqlen_k = int(seq_lens.max())
    scheduler_metadata = get_scheduler_metadata(
        batch_size=batch, max_seqlen_q=1, max_seqlen_k=max_seqlen_k, num_heads_q=num_qo_heads,
        num_heads_kv=num_kv_heads, headdim=head_dim, cache_seqlens=seq_lens, qkv_dtype=q.dtype,
        cu_seqlens_q=cu_seqlens_q, page_size=page_size, causal=True, num_splits=VLLM_CUDA_GRAPH_MAX_SPLITS)
    out = torch.empty_like(q)

    def run():
        return flash_attn_varlen_func(
            q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=1, seqused_k=seq_lens,
            max_seqlen_k=max_seqlen_k, softmax_scale=1.0 / math.sqrt(head_dim), causal=True,
            block_table=block_table, scheduler_metadata=scheduler_metadata, fa_version=3,
            num_splits=VLLM_CUDA_GRAPH_MAX_SPLITS)

    return Peer("vllm_fa3", run, note=f"FA3 via vLLM, AOT scheduler metadata, num_splits={VLLM_CUDA_GRAPH_MAX_SPLITS}",
                to_output=lambda _: out)


# sglang/kernels/ops/attention/*.py, in import order: decode (decode_attention, metadata) and extend
# (extend_attention, which imports prefill_attention and decode_attention).
SGLANG_TRITON_FILES = ("score_mod", "decode_attention", "metadata", "prefill_attention", "extend_attention")


@functools.cache  # once per process: after a load from the wheel, `import sglang...` would find the stand-ins
def sglang_triton_modules() -> tuple[dict[str, types.ModuleType], str]:
    """SGLang's Triton attention modules (``SGLANG_TRITON_FILES``, by name) and where they came from.

    The installed SGLang if there is one. Else the files of the wheel named by
    ``ENGINE_BACKEND_SGLANG_WHEEL``, executed as they are under their own module names: their only
    imports outside torch/triton are each other and three helpers of ``sglang.srt.utils``, which
    stand in as SGLang defines them on CUDA (``is_hip``: ``torch.version.hip is not None``;
    ``is_cuda``: a CUDA build of torch; ``is_gfx95_supported``: an AMD-only check, False here).
    Importing the real ``sglang`` package would pull in the whole server.
    """
    try:
        return {name: importlib.import_module(f"sglang.kernels.ops.attention.{name}")
                for name in SGLANG_TRITON_FILES}, "installed sglang"
    except ImportError:
        wheel = os.environ.get("ENGINE_BACKEND_SGLANG_WHEEL")
        if not wheel:
            raise
    folder = tempfile.mkdtemp(prefix="sglang-triton-")
    with zipfile.ZipFile(wheel) as zf:
        for name in SGLANG_TRITON_FILES:
            zf.extract(f"sglang/kernels/ops/attention/{name}.py", folder)
    for package in ("sglang", "sglang.kernels", "sglang.kernels.ops", "sglang.kernels.ops.attention",
                    "sglang.srt"):
        sys.modules.setdefault(package, types.ModuleType(package)).__path__ = []
    utils = sys.modules.setdefault("sglang.srt.utils", types.ModuleType("sglang.srt.utils"))
    utils.is_hip = lambda: torch.version.hip is not None
    utils.is_cuda = lambda: torch.version.cuda is not None and torch.cuda.is_available()
    utils.is_gfx95_supported = lambda: False
    loaded = {}
    for name in SGLANG_TRITON_FILES:
        full = f"sglang.kernels.ops.attention.{name}"
        spec = util.spec_from_file_location(full, f"{folder}/sglang/kernels/ops/attention/{name}.py")
        module = util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)  # Triton reads the kernels' source from these files
        loaded[name] = module
    return loaded, f"files of {os.path.basename(wheel)}"


def sglang_triton_decode_peer(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor) -> Peer:
    """One-token decode over one-token pages: ``k_cache``/``v_cache`` ``[tokens, 1, Hkv, D]``."""
    import triton

    modules, source = sglang_triton_modules()
    decode_attention_fwd = modules["decode_attention"].decode_attention_fwd
    get_num_kv_splits_triton = modules["metadata"].get_num_kv_splits_triton

    if k_cache.shape[1] != 1:
        raise ValueError(f"SGLang's triton decode reads one-token pages; these hold {k_cache.shape[1]}")
    batch, num_qo_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k_buffer, v_buffer = k_cache.squeeze(1), v_cache.squeeze(1)  # SGLang's [tokens, Hkv, D] buffers
    lens = seq_lens.tolist()
    kv_indptr = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    kv_indptr[1:] = torch.cumsum(seq_lens, 0)
    kv_indices = torch.cat([block_table[r, :n] for r, n in enumerate(lens)]).to(torch.int64)
    num_kv_splits = torch.empty(batch, dtype=torch.int32, device=q.device)
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    schedule_seqs = 256 if batch < 256 else triton.next_power_of_2(batch)
    get_num_kv_splits_triton[(1,)](num_kv_splits, seq_lens, batch, 1, num_qo_heads, num_kv_heads,
                                   SGLANG_MAX_KV_SPLITS, sm_count, MAX_NUM_SEQ=schedule_seqs)
    attn_logits = torch.empty(batch, num_qo_heads, SGLANG_MAX_KV_SPLITS, head_dim, dtype=torch.float32,
                              device=q.device)
    attn_lse = torch.empty(batch, num_qo_heads, SGLANG_MAX_KV_SPLITS, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    sm_scale = 1.0 / math.sqrt(head_dim)
    use_pdl = torch.cuda.get_device_capability(q.device)[0] >= 9  # the backend's is_arch_support_pdl()

    def run():
        decode_attention_fwd(q, k_buffer, v_buffer, out, kv_indptr, kv_indices, attn_logits, attn_lse,
                             num_kv_splits, SGLANG_MAX_KV_SPLITS, sm_scale, 1.0, 1.0, use_pdl=use_pdl)

    return Peer("sglang_triton", run,
                note=f"SGLang triton decode ({source}), max_kv_splits={SGLANG_MAX_KV_SPLITS}, use_pdl={use_pdl}",
                to_output=lambda _: out)


def sglang_triton_extend_peer(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_buffer: torch.Tensor,
                              v_buffer: torch.Tensor, req_to_token: torch.Tensor, prefix_lens: list[int],
                              extend_lens: list[int]) -> Peer:
    """Causal extend as SGLang's ``triton`` backend runs it (``forward_extend``): queries ``q`` and the
    step's new ``k_new``/``v_new`` contiguous (``[tokens, H, D]``), each request's cached prefix read from
    the pool ``k_buffer``/``v_buffer`` (``[slots, Hkv, D]``) through its first ``prefix_lens[r]`` slots of
    ``req_to_token[r]`` (int64 slot ids, as its metadata builds them); called through
    ``torch.compiler.disable`` as the backend wraps it."""
    modules, source = sglang_triton_modules()
    extend_attention_fwd = torch.compiler.disable(modules["extend_attention"].extend_attention_fwd)
    device = q.device
    qo_indptr = torch.tensor([0, *itertools.accumulate(extend_lens)], dtype=torch.int32, device=device)
    kv_indptr = torch.tensor([0, *itertools.accumulate(prefix_lens)], dtype=torch.int32, device=device)
    kv_indices = torch.cat([req_to_token[r, :n].long() for r, n in enumerate(prefix_lens)] +
                           [torch.empty(0, dtype=torch.int64, device=device)])
    max_extend_len = max(extend_lens)
    out = torch.empty_like(q)
    sm_scale = 1.0 / math.sqrt(q.shape[-1])

    def run():
        extend_attention_fwd(q, k_new, v_new, out, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, None,
                             True, None, max_extend_len, 1.0, 1.0, sm_scale, logit_cap=0.0, page_size=1)

    return Peer("sglang_triton_extend", run, note=f"SGLang triton extend ({source})", to_output=lambda _: out)
