"""Real SGLang objects for the SGLang adapter's tests, built without a GPU or model weights.

A ModelRunner needs a GPU and a loaded model, so tests assemble what the attention backend
reads from one -- real ServerArgs and ModelConfig (from a small config.json), real
RadixAttention layers, a real ReqToTokenPool, MHATokenToKVPool and token allocator -- in a
``SimpleNamespace`` with the runner's attribute names. ``reference_kernels.ReferenceKernels``
stands in for the CUDA kernels (plain torch, any device) so the backend's whole path runs on CPU.

Imports SGLang lazily (the tests importing this module skip where SGLang is not installed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

LLAMA_LIKE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def write_model_config(directory: Path, **overrides) -> Path:
    """A model directory holding only config.json (enough for ServerArgs and ModelConfig)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**LLAMA_LIKE, **overrides}))
    return directory


def server_args(model_dir: Path, device: str = "cpu", **overrides):
    """A real ServerArgs (its __post_init__ resolution runs) for a config-only model dir."""
    from sglang.srt.server_args import ServerArgs

    kwargs = dict(
        model_path=str(model_dir), device=device, skip_tokenizer_init=True, attention_backend="engine_backend"
    )
    kwargs.update(overrides)
    return ServerArgs(**kwargs)


def make_radix_layers(
    config: dict, *, sliding_window_size: int = -1, logit_cap: float = 0.0, **layer_kwargs
) -> torch.nn.ModuleList:
    from sglang.srt.layers.radix_attention import RadixAttention

    head_dim = config["head_dim"]
    return torch.nn.ModuleList(
        RadixAttention(
            config["num_attention_heads"],
            head_dim,
            1.0 / math.sqrt(head_dim),
            config["num_key_value_heads"],
            layer_id=i,
            logit_cap=logit_cap,
            sliding_window_size=sliding_window_size,
            **layer_kwargs,
        )
        for i in range(config["num_hidden_layers"])
    )


def runner(
    tmp_dir: Path,
    *,
    page_size: int = 1,
    device: str = "cpu",
    num_slots: int = 1024,
    max_requests: int = 8,
    context_len: int = 512,
    kv_cache_dtype: torch.dtype = torch.bfloat16,
    model: torch.nn.Module | None = None,
    config_overrides: dict | None = None,
    server_overrides: dict | None = None,
) -> SimpleNamespace:
    """What SGLang's ModelRunner exposes to an attention backend, built from real parts."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    config = {**LLAMA_LIKE, **(config_overrides or {})}
    model_dir = write_model_config(tmp_dir / "model", **config)
    args = server_args(model_dir, device=device, page_size=page_size, **(server_overrides or {}))
    model_config = ModelConfig.from_server_args(args)
    pool = MHATokenToKVPool(
        size=num_slots,
        page_size=page_size,
        dtype=kv_cache_dtype,
        head_num=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        layer_num=config["num_hidden_layers"],
        device=device,
        enable_memory_saver=False,
        enable_alt_stream=False,
    )
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(num_slots, kv_cache_dtype, device, pool, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(num_slots, page_size, kv_cache_dtype, device, pool, need_sort=False)
    return SimpleNamespace(
        server_args=args,
        model_config=model_config,
        model=model if model is not None else make_radix_layers(config),
        device=device,
        dtype=model_config.dtype,
        kv_cache_dtype=kv_cache_dtype,
        page_size=page_size,
        attention_chunk_size=model_config.attention_chunk_size,
        req_to_token_pool=ReqToTokenPool(max_requests, context_len, device, enable_memory_saver=False),
        token_to_kv_pool=pool,
        token_to_kv_pool_allocator=allocator,
        use_mla_backend=False,
        is_draft_worker=False,
    )


# ----------------------------------------------------------------------- requests
@dataclass
class Request:
    """One request's place in the pools: its request-table row and its KV slots, in order."""

    row: int
    slots: list  # KV slot of each token
    pages: list  # page ids, in order (slot // page_size of every page_size-th token)


def place_requests(run: SimpleNamespace, seq_lens: list[int], shared_prefix_pages: int = 0) -> list[Request]:
    """Allocate KV for requests with SGLang's own allocator and enter them in the request
    table the way the scheduler does. Pages are handed out round-robin across requests so
    no request's pages are contiguous; with ``shared_prefix_pages`` every request after the
    first reuses the first request's leading pages (a radix-cache hit)."""
    page = run.page_size
    rows = run.req_to_token_pool.alloc([SimpleNamespace(req_pool_idx=None) for _ in seq_lens])
    pages = [[] for _ in seq_lens]
    for j in range(max(-(-n // page) for n in seq_lens)):
        for r, n in enumerate(seq_lens):
            if j * page >= n:
                continue
            if r > 0 and j < shared_prefix_pages:
                pages[r].append(pages[0][j])
                continue
            slots = run.token_to_kv_pool_allocator.alloc(page)
            pages[r].append(int(slots[0]) // page)
    requests = []
    for r, n in enumerate(seq_lens):
        slots = [pages[r][t // page] * page + t % page for t in range(n)]
        run.req_to_token_pool.write((rows[r], slice(0, n)), torch.tensor(slots, dtype=torch.int32))
        requests.append(Request(row=rows[r], slots=slots, pages=pages[r]))
    return requests


def decode_batch(run: SimpleNamespace, requests: list[Request]):
    """A real ForwardBatch decoding the last token of each request."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    device = run.device
    seq_lens = [len(r.slots) for r in requests]
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=len(requests),
        input_ids=torch.zeros(len(requests), dtype=torch.int64, device=device),
        req_pool_indices=torch.tensor([r.row for r in requests], dtype=torch.int64, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        out_cache_loc=torch.tensor([r.slots[-1] for r in requests], dtype=torch.int64, device=device),
        seq_lens_sum=sum(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
        positions=torch.tensor([n - 1 for n in seq_lens], dtype=torch.int64, device=device),
    )


def extend_batch(run: SimpleNamespace, requests: list[Request], extend_lens: list[int], mixed: bool = False):
    """A real ForwardBatch extending each request by its last ``extend_lens[r]`` tokens."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    device = run.device
    seq_lens = [len(r.slots) for r in requests]
    prefix_lens = [n - e for n, e in zip(seq_lens, extend_lens)]
    new_slots = [s for r, p in zip(requests, prefix_lens) for s in r.slots[p:]]
    positions = [t for n, p in zip(seq_lens, prefix_lens) for t in range(p, n)]
    return ForwardBatch(
        forward_mode=ForwardMode.MIXED if mixed else ForwardMode.EXTEND,
        batch_size=len(requests),
        input_ids=torch.zeros(len(new_slots), dtype=torch.int64, device=device),
        req_pool_indices=torch.tensor([r.row for r in requests], dtype=torch.int64, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        out_cache_loc=torch.tensor(new_slots, dtype=torch.int64, device=device),
        seq_lens_sum=sum(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
        extend_num_tokens=len(new_slots),
        extend_seq_lens=torch.tensor(extend_lens, dtype=torch.int32, device=device),
        extend_prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=device),
        extend_seq_lens_cpu=list(extend_lens),
        extend_prefix_lens_cpu=list(prefix_lens),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
    )


# ----------------------------------------------------------------------- graphs
class DecodeGraphInputs:
    """The decode CUDA-graph runner's static inputs, built and filled with SGLang's own
    functions (``_allocate_decode_buffers``, ``build_decode_registry``, ``fill_from``,
    ``build_replay_fb_view``), so a test sees exactly the padded view the backend is given
    before a capture or a replay."""

    def __init__(self, run: SimpleNamespace, max_bs: int, seq_len_fill_value: int):
        from sglang.srt.model_executor.cuda_graph_buffer_registry import build_decode_registry
        from sglang.srt.model_executor.runner.base_runner import _allocate_decode_buffers

        config = run.model_config
        self.fill = seq_len_fill_value
        # What the graph runner hands both SGLang functions: one query token per request.
        sizes = dict(device=run.device, max_bs=max_bs, max_num_token=max_bs, seq_len_fill_value=seq_len_fill_value,
                     cache_loc_dtype=torch.int64)
        self.buffers = _allocate_decode_buffers(
            **sizes,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            dtype=config.dtype,
            dp_size=1,
            pp_size=1,
            is_encoder_decoder=False,
            require_mlp_tp_gather=False,
            encoder_len_fill_value=0,
            num_tokens_per_req=1,
            enable_mamba_track=False,
        )
        self.registry = build_decode_registry(**sizes, source=self.buffers)

    def load(self, forward_batch, padded_bs: int):
        """Copy a real batch into the static buffers; return the replay view for ``padded_bs``."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

        raw_bs = forward_batch.batch_size
        self.registry.fill_from(
            forward_batch, raw_bs=raw_bs, padded_bs=padded_bs, raw_num_tokens=raw_bs, padded_num_tokens=padded_bs
        )
        return build_replay_fb_view(
            forward_batch=forward_batch,
            buffers=self.buffers,
            bs=padded_bs,
            raw_bs=raw_bs,
            num_tokens=padded_bs,
            seq_len_fill_value=self.fill,
            capture_forward_mode=ForwardMode.DECODE,
            is_encoder_decoder=False,
        )
