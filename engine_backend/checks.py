"""Checks of what the public API is handed, in one place: arguments that must be integers, index
tensors, the device, the KV cache views, the packed query and output rows, a plan's BSR and a run's
arguments. Every check raises ``ValueError`` naming the argument and what it must be.

Checks of tensor *values* (page ids, lengths) read the data: on CPU tensors that is free, on a
device it is a synchronization, which the per-step builders and CUDA-graph capture cannot afford.
So values are checked on CPU tensors always and on device tensors only in debug mode
(``ENGINE_BACKEND_DEBUG=1``); shapes, dtypes and devices are always checked.

The KV cache is read in place: kernels see K and V as ``[num_pages, page_size, num_kv_heads,
head_dim]`` with any strides except a contiguous head dim, so every engine's layout is a view,
never a copy:

* vLLM ``[2, num_blocks, block_size, H, D]``: ``kv_cache[0]``, ``kv_cache[1]``;
* FlashInfer-style ``[num_blocks, 2, block_size, H, D]``: ``kv_cache[:, 0]``, ``kv_cache[:, 1]``;
* SGLang per-layer ``[num_slots, H, D]``: ``buf.unsqueeze(1)`` (page size 1) or
  ``buf.view(-1, P, H, D)`` (page size P);
* ragged new K/V ``[tokens, H, D]``: ``k.unsqueeze(1)`` with ``BSR.from_ragged``.
"""

from __future__ import annotations

import math
import operator
import os

import torch


def debug_mode() -> bool:
    """Whether ``ENGINE_BACKEND_DEBUG`` asks for the checks that synchronize with the device."""
    return os.environ.get("ENGINE_BACKEND_DEBUG", "0") not in ("", "0")


def values_checked(*tensors: torch.Tensor, debug: bool | None = None) -> bool:
    """Whether to check the values of ``tensors``: in debug mode (``debug``, default: the
    environment), or when all of them are on the CPU (no device sync)."""
    debug = debug_mode() if debug is None else debug
    return debug or all(t.device.type == "cpu" for t in tensors)


def is_integer(value) -> bool:
    """Whether ``value`` is an integer (numpy's and 0-d integer tensors included), never a float
    or a bool: ``128.0 in (64, 128)`` and ``True in (1, 2)`` hold in Python, yet neither is a head
    dim or a page size."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def as_int(name: str, value, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (see ``is_integer``), at least ``minimum``."""
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    number = operator.index(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def as_finite(name: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite Python float (an int or float, never a bool)."""
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        number = float(value)
    except TypeError:
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if positive and not number > 0:
        raise ValueError(f"{name} must be positive, got {number}")
    return number


def integer_tensor(name: str, t, dims: int) -> torch.Tensor:
    """``t`` if it is a ``dims``-D torch tensor of an integer dtype (index data: page ids,
    lengths, offsets); a float tensor would be truncated, so it is refused."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (int32 or int64), got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def cuda_device(device) -> torch.device:
    """The CUDA device a wrapper runs on (``None``: the current one), with its index resolved."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        raise ValueError(f"kernels run on CUDA devices, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def check_paged(name: str, cache: torch.Tensor, page_size: int, num_kv_heads: int, head_dim: int, dtype) -> None:
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_pages, page_size, num_kv_heads, head_dim], got shape {tuple(cache.shape)}")
    _, p, h, d = cache.shape
    if (p, h, d) != (page_size, num_kv_heads, head_dim):
        raise ValueError(
            f"{name} has (page_size, kv heads, head dim) = {(p, h, d)}, expected {(page_size, num_kv_heads, head_dim)}"
        )
    if cache.dtype != dtype:
        raise ValueError(f"{name} has dtype {cache.dtype}, expected {dtype}")
    if not cache.is_cuda:
        raise ValueError(f"{name} must be on a CUDA device")
    if cache.stride(3) != 1 or cache.data_ptr() % 16 or any(s % 8 for s in cache.stride()[:3]):
        raise ValueError(f"{name} must have a contiguous head dim and 16-byte aligned rows")


def check_rows(name: str, t: torch.Tensor, rows: int, heads: int, head_dim: int, dtype) -> None:
    """A packed [rows, heads, head_dim] query/output tensor."""
    if t.dim() != 3 or t.shape[1:] != (heads, head_dim) or t.shape[0] < rows:
        raise ValueError(f"{name} must be [>= {rows}, {heads}, {head_dim}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if not t.is_cuda or not rows_readable_in_place(t):
        raise ValueError(f"{name} must be a CUDA tensor with a contiguous, 16-byte aligned head dim")


def rows_readable_in_place(t: torch.Tensor) -> bool:
    """Whether the kernels can read a ``[rows, heads, head_dim]`` tensor as it is: head dim
    contiguous, rows and heads on 16-byte boundaries (16-byte loads). Other strides are free, so
    a column slice of a fused QKV projection needs no copy."""
    return t.stride(2) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0


def wrapper_args(*, sm_scale, head_dim: int, **counts) -> float:
    """Refuse, before any GPU work, a wrapper's ``counts`` (capacities, CTAs per SM; None: not
    given) that are not positive integers and a softmax scale that is not finite and positive
    (the prefill kernel folds the scale into exp2 after a max of raw scores); returns the scale,
    by default ``1 / sqrt(head_dim)``."""
    for name, value in counts.items():
        if value is not None:
            as_int(name, value, minimum=1)
    return as_finite("sm_scale", 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale, positive=True)


def check_plan_input(kv, *, max_batch_size: int, page_size: int, device) -> None:
    """A BSR a wrapper can plan: within its batch capacity, page size and device."""
    from .format import BSR  # here: format imports this module

    if not isinstance(kv, BSR):
        raise ValueError(f"plan() takes an engine_backend.BSR, got {type(kv).__name__}")
    if kv.num_rows > max_batch_size:
        raise ValueError(f"batch of {kv.num_rows} requests exceeds max_batch_size={max_batch_size}")
    if kv.page_size != page_size:
        raise ValueError(f"BSR page size {kv.page_size} differs from this wrapper's {page_size}")
    if kv.device != device:
        raise ValueError(f"BSR is on {kv.device}, the wrapper on {device}")


def check_run_inputs(q, k_cache, v_cache, out, *, rows: int, heads: int, kv_heads: int, head_dim: int,
                     page_size: int, dtype, alibi: bool, alibi_slopes, device: torch.device | None = None):
    """Validate a run() call before any launch; returns ``out`` (allocated if None) and the
    ALiBi slopes the kernel should see (None unless the variant has ALiBi). Every tensor must be
    on ``device`` (the wrapper's, whose plan the kernel reads; default: ``q``'s)."""
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "out": out, "alibi_slopes": alibi_slopes}
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_rows("q", q, rows, heads, head_dim, dtype)
    device = q.device if device is None else device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the wrapper's device)")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_paged(name, cache, page_size, kv_heads, head_dim, dtype)
    out = torch.empty_like(q) if out is None else out
    check_rows("out", out, max(rows, q.shape[0]), heads, head_dim, dtype)
    if not alibi:
        if alibi_slopes is not None:
            raise ValueError("alibi_slopes given to a variant without ALiBi (Variant(alibi=True) adds them)")
        return out, None
    if (alibi_slopes is None or alibi_slopes.shape != (heads,) or alibi_slopes.dtype != torch.float32
            or alibi_slopes.stride(0) != 1):
        raise ValueError(f"this ALiBi variant needs alibi_slopes: a contiguous float32 [{heads}] on {device}")
    return out, alibi_slopes
