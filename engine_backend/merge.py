"""Merge of attention states on the GPU (see ``reference.merge_state`` for the definition).

``lse`` is natural log, float32; ``v`` is fp16/bf16 ``[N, H, D]`` with ``D`` a multiple of 8.
"""

from __future__ import annotations

import torch

from .kernels import jit, specs


def _ops(dtype: torch.dtype):
    return jit.load(specs.merge_state_spec(dtype))


def _check(v: torch.Tensor, lse: torch.Tensor, name: str) -> None:
    if not v.is_cuda or not lse.is_cuda:
        raise ValueError(f"{name}: merge kernels need CUDA tensors")
    if v.dim() != 3 or lse.shape != v.shape[:2]:
        raise ValueError(f"{name}: expected v [N, H, D] and lse [N, H], got {tuple(v.shape)} and {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise ValueError(f"{name}: lse must be float32, got {lse.dtype}")
    if v.shape[2] % 8 or 256 % (v.shape[2] // 8) or v.stride(2) != 1:
        # 8 elements a thread and 256 threads a block: a row must not span blocks.
        raise ValueError(f"{name}: head dim must be 8 times a divisor of 256 (8..2048, e.g. 64/128/256) and contiguous, got {v.shape[2]}")
    # The kernels move 8 elements (16 bytes) at a time, so every (n, h) row must start 16-byte aligned.
    if v.data_ptr() % 16 or any(v.stride(i) % 8 for i in (0, 1) if v.shape[i] > 1):
        raise ValueError(f"{name}: v must be 16-byte aligned with strides a multiple of 8, got strides {v.stride()}")


def _check_out(out: torch.Tensor, shape, dtype: torch.dtype) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out: expected {tuple(shape)} {dtype}, got {tuple(out.shape)} {out.dtype}")


def merge_state(v_a, lse_a, v_b, lse_b, out=None, out_lse=None):
    """Return (V, lse) = (v_a, lse_a) ⊕ (v_b, lse_b). ``out``/``out_lse`` may alias the inputs."""
    _check(v_a, lse_a, "a")
    _check(v_b, lse_b, "b")
    if v_b.shape != v_a.shape or v_b.dtype != v_a.dtype:
        raise ValueError(f"states differ: {tuple(v_a.shape)} {v_a.dtype} vs {tuple(v_b.shape)} {v_b.dtype}")
    out = torch.empty_like(v_a) if out is None else out
    out_lse = torch.empty_like(lse_a) if out_lse is None else out_lse
    _check(out, out_lse, "out")
    _check_out(out, v_a.shape, v_a.dtype)
    _ops(v_a.dtype).merge_state(v_a, lse_a, v_b, lse_b, out, out_lse)
    return out, out_lse


def merge_state_(v_a, lse_a, v_b, lse_b):
    """In place: (v_a, lse_a) ← (v_a, lse_a) ⊕ (v_b, lse_b)."""
    return merge_state(v_a, lse_a, v_b, lse_b, out=v_a, out_lse=lse_a)


def merge_states(v, lse, indptr, out=None, out_lse=None):
    """n-way: row i of the result merges states ``indptr[i] : indptr[i + 1]``."""
    _check(v, lse, "v")
    if indptr.dtype != torch.int32 or indptr.device != v.device or indptr.dim() != 1:
        raise ValueError("indptr must be a 1-D int32 tensor on the states' device")
    n = indptr.shape[0] - 1
    out = torch.empty(n, *v.shape[1:], dtype=v.dtype, device=v.device) if out is None else out
    out_lse = torch.empty(n, v.shape[1], dtype=torch.float32, device=v.device) if out_lse is None else out_lse
    _check(out, out_lse, "out")
    _check_out(out, (n, *v.shape[1:]), v.dtype)
    _ops(v.dtype).merge_states(v, lse, indptr, out, out_lse)
    return out, out_lse
