"""Measured peers: FlashInfer 0.6.14 and PyTorch's fused attention, on the very tensors we time.

Each ``*_peer`` function does all set-up (FlashInfer plan(), layout conversion, output buffers)
when it is called and returns a :class:`Peer` whose ``run()`` is only the attention call, so
``timing.time_cuda(peer.run)`` times what the peer does per step and ``peer.output()`` gives
its result to compare with ours.

FlashInfer is imported lazily here and nowhere in the package. On the GPU host its kernels come
pre-compiled (benchmarks/build_peer_cache.py, docs/peers.md): call :func:`setup_flashinfer_env`
before anything imports flashinfer.

Inputs follow our own conventions (engine_backend.format.BSR):

* paged KV: ``k_cache`` / ``v_cache`` are ``[num_pages, page_size, Hkv, D]`` views with equal
  strides (e.g. vLLM's ``kv_cache[0]`` / ``kv_cache[1]``), addressed by a BSR (build one from a
  block table with ``BSR.from_block_table``);
* ragged: ``q [Tq, Hq, D]``, ``k`` / ``v`` ``[Tk, Hkv, D]``, int32 ``qo_indptr`` / ``kv_indptr``.

Causal masks are aligned to the end of each row's KV, as in our kernels and FlashInfer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks.timing import Timing, time_cuda
from engine_backend.format import BSR

FLASHINFER_VERSION = "0.6.14"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_AOT_DIR = REPO_ROOT / ".stage" / "flashinfer-aot"
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace (split-KV partials)
FLASHINFER_BACKENDS = ("fa2", "fa3")
SDPA_BACKENDS = ("flash", "cudnn")


@dataclass
class Peer:
    """One planned peer kernel: ``run()`` launches it; ``output()`` gives its result."""

    name: str
    run: Callable[[], object]  # the timed call: the attention launch(es) and nothing else
    note: str = ""  # anything about how it ran that a reader of the numbers must know
    # Turns what run() returned into [tokens, Hq, D]; kept out of run() so layout changes aren't timed.
    to_output: Callable[[object], torch.Tensor] = lambda result: result

    def output(self) -> torch.Tensor:
        """A copy of the peer's output as ``[tokens, Hq, D]``, safe to keep while the peer runs again."""
        out = self.to_output(self.run())
        torch.cuda.synchronize()
        return out.clone()


# --------------------------------------------------------------------------- FlashInfer set-up
def setup_flashinfer_env(aot_dir: Path | str | None = None, *, allow_jit: bool = False) -> dict[str, str]:
    """Point FlashInfer at the pre-compiled modules; call before the first ``import flashinfer``.

    FlashInfer loads ``<package>/data/aot/<uri>/<uri>.so`` directly when it exists, running
    neither ninja nor nvcc, so the carried modules are copied there. The package is located
    without importing it. Unless ``allow_jit``, FLASHINFER_DISABLE_JIT makes a module missing
    from the cache an immediate error instead of minutes of compilation on GPU time.
    Returns the environment variables it set.
    """
    if "flashinfer" in sys.modules:
        raise RuntimeError("setup_flashinfer_env() must run before flashinfer is imported: it reads its "
                           "environment at import time")
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or spec.origin is None:
        raise RuntimeError(_missing_flashinfer_message())
    aot_source = Path(aot_dir) if aot_dir is not None else DEFAULT_AOT_DIR
    manifest = _read_manifest(aot_source)
    _install_modules(aot_source, Path(spec.origin).parent / "data" / "aot", manifest)

    settings = {
        # The generators still write their (unused) sources under the workspace: keep it off $HOME.
        "FLASHINFER_WORKSPACE_BASE": os.environ.get("FLASHINFER_WORKSPACE_BASE")
        or str(Path(tempfile.gettempdir()) / "flashinfer-workspace"),
    }
    if not allow_jit:
        settings["FLASHINFER_DISABLE_JIT"] = "1"
    os.environ.update(settings)
    global _env_ready
    _env_ready = True
    return settings


_env_ready = False


def _missing_flashinfer_message() -> str:
    return (f"flashinfer-python=={FLASHINFER_VERSION} is not installed: it is a benchmark-only peer. "
            "See docs/peers.md for installing it from carried wheels on the GPU host.")


def _read_manifest(aot_dir: Path) -> dict:
    manifest_path = aot_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RuntimeError(f"no FlashInfer module cache at {aot_dir} (expected manifest.json): build it with "
                           "benchmarks/build_peer_cache.py and carry it (docs/peers.md)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("flashinfer") != FLASHINFER_VERSION:
        raise RuntimeError(f"module cache {aot_dir} was built for flashinfer {manifest.get('flashinfer')}, "
                           f"not {FLASHINFER_VERSION}")
    return manifest


def _install_modules(source: Path, target: Path, manifest: dict) -> None:
    for uri, info in manifest["modules"].items():
        src = source / uri / f"{uri}.so"
        dst = target / uri / f"{uri}.so"
        if not src.is_file() or src.stat().st_size != info["bytes"]:
            raise RuntimeError(f"module {src} is missing or truncated (manifest says {info['bytes']} bytes)")
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _flashinfer():
    """Import FlashInfer, first pointing it at the carried modules if nobody did: a wrapper's
    plan() would otherwise JIT-compile on the GPU host (minutes of device time per module)."""
    if not _env_ready and "flashinfer" not in sys.modules:
        setup_flashinfer_env()
    try:
        import flashinfer
    except ImportError as err:
        raise RuntimeError(_missing_flashinfer_message()) from err
    if flashinfer.__version__ != FLASHINFER_VERSION:
        raise RuntimeError(f"flashinfer {flashinfer.__version__} is installed; the peer cache and these "
                           f"benchmarks are for {FLASHINFER_VERSION}")
    return flashinfer


def _workspace(device: torch.device) -> torch.Tensor:
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def _check_backend(backend: str) -> None:
    if backend not in FLASHINFER_BACKENDS:
        raise ValueError(f"FlashInfer backend must be one of {FLASHINFER_BACKENDS}, got {backend!r}")


# --------------------------------------------------------------------------- layout conversion
@dataclass
class FlashInferPagedLayout:
    """FlashInfer's paged-KV description: pages used by each row, listed exactly (no padding)."""

    indptr: torch.Tensor  # int32 [rows + 1]
    indices: torch.Tensor  # int32 [indptr[-1]]
    last_page_len: torch.Tensor  # int32 [rows], tokens in each row's last page (1..page_size)


def flashinfer_paged_layout(kv: BSR) -> FlashInferPagedLayout:
    """Convert our BSR (rows may list spare pages) into FlashInfer's exact page lists.

    Rows with no KV are refused: FlashInfer describes a row's length by its last page, which
    cannot say "empty", and our kernels' kv_len 0 behaviour has no FlashInfer counterpart.
    """
    kv_lens = kv.kv_lens.long()
    if bool((kv_lens <= 0).any()):
        raise ValueError("FlashInfer peers need kv_len >= 1 in every row")
    pages_used = (kv_lens + kv.page_size - 1) // kv.page_size
    indptr = torch.zeros(kv.num_rows + 1, dtype=torch.long, device=kv.device)
    torch.cumsum(pages_used, dim=0, out=indptr[1:])
    total = int(indptr[-1])  # one sync, during set-up
    row_of_slot = torch.repeat_interleave(torch.arange(kv.num_rows, device=kv.device), pages_used,
                                          output_size=total)
    slot_in_row = torch.arange(total, device=kv.device) - indptr[row_of_slot]
    indices = kv.indices[kv.indptr.long()[row_of_slot] + slot_in_row]
    last_page_len = kv_lens - (pages_used - 1) * kv.page_size
    return FlashInferPagedLayout(indptr.int(), indices.int().contiguous(), last_page_len.int())


# --------------------------------------------------------------------------- FlashInfer peers
def flashinfer_decode_peer(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv: BSR, *,
                           sm_scale: float | None = None) -> Peer:
    """BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True): decode through FA2's prefill
    kernels, FlashInfer's faster path for grouped-query heads. ``q`` is ``[rows, Hq, D]``."""
    flashinfer = _flashinfer()
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    layout = flashinfer_paged_layout(kv)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(q.device), "NHD", use_tensor_cores=True)
    wrapper.plan(layout.indptr, layout.indices, layout.last_page_len, q.shape[1], num_kv_heads, head_dim,
                 page_size, q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=sm_scale)
    out = torch.empty_like(q)
    return Peer("flashinfer-decode-tc", lambda: wrapper.run(q, (k_cache, v_cache), out=out))


def flashinfer_paged_prefill_peer(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv: BSR, *,
                                  backend: str = "fa2", sm_scale: float | None = None) -> Peer:
    """BatchPrefillWithPagedKVCacheWrapper, causal: new queries ``q [Tq, Hq, D]`` (rows split by
    ``kv.qo_indptr``) against paged KV that already holds them (the append / chunked-prefill case)."""
    _check_backend(backend)
    flashinfer = _flashinfer()
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    layout = flashinfer_paged_layout(kv)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace(q.device), "NHD", backend=backend)
    wrapper.plan(kv.qo_indptr, layout.indptr, layout.indices, layout.last_page_len, q.shape[1], num_kv_heads,
                 head_dim, page_size, causal=True, q_data_type=q.dtype, kv_data_type=k_cache.dtype,
                 sm_scale=sm_scale)
    out = torch.empty_like(q)
    return Peer(f"flashinfer-paged-prefill-{backend}", lambda: wrapper.run(q, (k_cache, v_cache), out=out))


def flashinfer_ragged_prefill_peer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qo_indptr: torch.Tensor,
                                   kv_indptr: torch.Tensor, *, backend: str = "fa2",
                                   sm_scale: float | None = None) -> Peer:
    """BatchPrefillWithRaggedKVCacheWrapper, causal, on contiguous per-request K/V."""
    _check_backend(backend)
    flashinfer = _flashinfer()
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace(q.device), "NHD", backend=backend)
    wrapper.plan(qo_indptr.int(), kv_indptr.int(), q.shape[1], k.shape[1], q.shape[2], causal=True,
                 q_data_type=q.dtype, kv_data_type=k.dtype, sm_scale=sm_scale)
    out = torch.empty_like(q)
    return Peer(f"flashinfer-ragged-prefill-{backend}", lambda: wrapper.run(q, k, v, out=out))


# --------------------------------------------------------------------------- PyTorch peers
def _row_lengths(indptr: torch.Tensor) -> list[int]:
    return (indptr[1:] - indptr[:-1]).tolist()


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    if name not in SDPA_BACKENDS:
        raise ValueError(f"SDPA backend must be one of {SDPA_BACKENDS}, got {name!r}")
    return SDPBackend.FLASH_ATTENTION if name == "flash" else SDPBackend.CUDNN_ATTENTION


def sdpa_prefill_peer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qo_indptr: torch.Tensor,
                      kv_indptr: torch.Tensor, *, backend: str = "flash", sm_scale: float | None = None) -> Peer:
    """torch SDPA restricted to one fused backend, causal, on a ragged prefill batch.

    SDPA takes dense ``[B, H, L, D]`` batches, so equal-length rows run as one call on views of
    the ragged tensors (no copy); unequal rows run one call per row, all inside ``run()``
    (launch overhead included, as a user of SDPA would pay it). Its causal mask is aligned to
    the top-left, which equals ours only when each row's queries are its whole KV, so other
    batches are refused. GQA uses ``enable_gqa=True`` where the backend takes it; otherwise
    K/V heads are repeated once during set-up and the peer's note says so.
    """
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q_lens, kv_lens = _row_lengths(qo_indptr), _row_lengths(kv_indptr)
    if q_lens != kv_lens:
        raise ValueError("sdpa_prefill_peer needs query length == KV length in every row (SDPA's causal mask "
                         "is top-left aligned)")
    kernel = _sdpa_backend(backend)
    batches = _dense_batches(q, k, v, q_lens)
    group = q.shape[1] // k.shape[1]

    def attend(batches, gqa: bool) -> list[torch.Tensor]:
        with sdpa_kernel(kernel):
            return [F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=sm_scale, enable_gqa=gqa)
                    for qb, kb, vb in batches]

    note = ""
    try:
        attend(batches, gqa=group > 1)
        gqa = group > 1
    except RuntimeError:
        if group == 1:
            raise
        batches = [(qb, kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1))
                   for qb, kb, vb in batches]
        attend(batches, gqa=False)  # still failing means the backend cannot run this shape at all
        gqa = False
        note = f"{backend} SDPA refused enable_gqa: K/V heads repeated x{group} before timing"
    if len(batches) > 1:
        note = "; ".join(filter(None, [note, f"{len(batches)} rows of unequal length: one SDPA call per row"]))
    return Peer(f"sdpa-{backend}", lambda: attend(batches, gqa), note, to_output=_ragged_from_dense)


def _ragged_from_dense(outs: list[torch.Tensor]) -> torch.Tensor:
    """SDPA's [B, H, L, D] outputs back to packed [tokens, H, D]."""
    return torch.cat([o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]) for o in outs])


def _dense_batches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]):
    """[(q, k, v)] as [B, H, L, D] views: one batch when all rows share a length, else one per row."""
    def dense(t: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        return t.view(rows, length, t.shape[1], t.shape[2]).transpose(1, 2)

    if len(set(lens)) == 1:
        return [(dense(q, len(lens), lens[0]), dense(k, len(lens), lens[0]), dense(v, len(lens), lens[0]))]
    batches, start = [], 0
    for length in lens:
        rows = slice(start, start + length)
        batches.append((dense(q[rows], 1, length), dense(k[rows], 1, length), dense(v[rows], 1, length)))
        start += length
    return batches


def torch_varlen_prefill_peer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qo_indptr: torch.Tensor,
                              kv_indptr: torch.Tensor, *, sm_scale: float | None = None) -> Peer:
    """torch.nn.attention.varlen.varlen_attn (PyTorch's FlashAttention-2 varlen kernel), causal:
    ragged rows in one launch, GQA native, causal mask aligned to the end of each row's KV."""
    from torch.nn.attention.varlen import varlen_attn

    cu_q, cu_k = qo_indptr.int(), kv_indptr.int()
    max_q, max_k = max(_row_lengths(qo_indptr)), max(_row_lengths(kv_indptr))
    return Peer("torch-varlen-flash",
                lambda: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=sm_scale, window_size=(-1, 0)))


# --------------------------------------------------------------------------- one-call measurements
def measure(peer: Peer, **timing_options) -> tuple[Timing, torch.Tensor]:
    """Time ``peer.run()`` (benchmarks.timing.time_cuda options) and return its output too.
    A peer's note (how it had to run) is printed, so it reaches the benchmark's log."""
    if peer.note:
        print(f"[{peer.name}] {peer.note}")
    return time_cuda(peer.run, **timing_options), peer.output()


def prefill_peers() -> dict[str, Callable[..., tuple[Timing, torch.Tensor]]]:
    """Every ragged causal-prefill peer as ``fn(q, k, v, indptr, **timing_options)``, where each
    row's queries are its whole KV (``indptr`` splits q and k/v alike)."""
    def flashinfer(backend):
        return lambda q, k, v, indptr, **kw: measure(
            flashinfer_ragged_prefill_peer(q, k, v, indptr, indptr, backend=backend), **kw)

    def sdpa(backend):
        return lambda q, k, v, indptr, **kw: measure(sdpa_prefill_peer(q, k, v, indptr, indptr, backend=backend), **kw)

    return {
        "flashinfer_fa2": flashinfer("fa2"),
        "flashinfer_fa3": flashinfer("fa3"),
        "sdpa_flash": sdpa("flash"),
        "sdpa_cudnn": sdpa("cudnn"),
        "torch_varlen": lambda q, k, v, indptr, **kw: measure(torch_varlen_prefill_peer(q, k, v, indptr, indptr), **kw),
    }


def flashinfer_paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_table: torch.Tensor, seq_lens: torch.Tensor, qo_indptr: torch.Tensor,
                             page_size: int, *, backend: str = "fa2", **timing_options) -> tuple[Timing, torch.Tensor]:
    """FlashInfer paged causal prefill (append case) on a vLLM-style block table: (timing, output)."""
    if k_cache.shape[1] != page_size:
        raise ValueError(f"k_cache pages hold {k_cache.shape[1]} tokens, page_size says {page_size}")
    kv = BSR.from_block_table(block_table, seq_lens, page_size, qo_indptr)
    return measure(flashinfer_paged_prefill_peer(q, k_cache, v_cache, kv, backend=backend), **timing_options)


def flashinfer_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, page_size: int, **timing_options) -> tuple[Timing, torch.Tensor]:
    """FlashInfer tensor-core decode on a vLLM-style block table: (timing of run(), output)."""
    if k_cache.shape[1] != page_size:
        raise ValueError(f"k_cache pages hold {k_cache.shape[1]} tokens, page_size says {page_size}")
    kv = BSR.from_block_table(block_table, seq_lens, page_size)
    return measure(flashinfer_decode_peer(q, k_cache, v_cache, kv), **timing_options)


def flashinfer_decode_plan_us(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                              num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                              dtype: torch.dtype = torch.bfloat16, reps: int = 200) -> float:
    """Host time of one FlashInfer decode plan(), in microseconds.

    The page lists are built once beforehand, with indptr and last_page_len on the CPU as
    FlashInfer's engine integrations pass them (plan() reads them on the host; device copies
    would add a sync per call). Our plan() builds its metadata itself, so this flatters the peer
    slightly, which is the safe direction for a comparison.
    """
    import time

    flashinfer = _flashinfer()
    layout = flashinfer_paged_layout(BSR.from_block_table(block_table, seq_lens, page_size))
    indptr, last_page_len = layout.indptr.cpu(), layout.last_page_len.cpu()
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(block_table.device), "NHD",
                                                            use_tensor_cores=True)

    def plan():
        wrapper.plan(indptr, layout.indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                     q_data_type=dtype, kv_data_type=dtype)

    plan()  # first call loads the module
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        plan()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / reps * 1e6
