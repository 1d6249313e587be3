"""Block-sparse-row (BSR) view of a KV cache: the one format every kernel reads.

A *row* is a group of query tokens (normally one request's); a *column block* is a KV page
of ``page_size`` tokens. Row ``r``:

* queries: ``q[qo_indptr[r] : qo_indptr[r + 1]]``;
* KV: the first ``kv_lens[r]`` tokens of the pages ``indices[indptr[r] : indptr[r + 1]]``,
  taken in that order. A row may list more pages than it uses (a padded vLLM block-table
  row, say); only ``ceil(kv_lens[r] / page_size)`` of them are read, so the last page used is
  the only partially filled block.

Query ``i`` of row ``r`` sits at position ``kv_lens[r] - q_len + i`` of the row's KV (the
queries are the newest tokens), which is what the causal mask and position-dependent
variants use.

``indices`` may be longer than ``indptr[-1]`` (fixed-capacity buffers, filled without a
device-to-host sync); entries past ``indptr[-1]`` are never read.

Every constructor runs on CPU or GPU tensors and never synchronizes with the device: they run
inside the engines' per-step metadata builders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

INDEX_DTYPE = torch.int32


def _debug_default() -> bool:
    return os.environ.get("ENGINE_BACKEND_DEBUG", "0") not in ("", "0")


def _int32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == INDEX_DTYPE else x.to(INDEX_DTYPE)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0] + 1, dtype=INDEX_DTYPE, device=x.device)
    torch.cumsum(x, dim=0, out=out[1:])
    return out


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x + (d - 1), d, rounding_mode="floor")


@dataclass
class BSR:
    """KV layout of a batch: see the module docstring for the exact meaning of each field."""

    indptr: torch.Tensor  # int32 [rows + 1], monotone, into ``indices``
    indices: torch.Tensor  # int32 [capacity >= indptr[-1]], page ids
    kv_lens: torch.Tensor  # int32 [rows], KV tokens each row attends to
    qo_indptr: torch.Tensor  # int32 [rows + 1], monotone, into the packed queries
    page_size: int  # KV tokens per column block

    @property
    def num_rows(self) -> int:
        return self.kv_lens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def to(self, device) -> "BSR":
        return BSR(
            self.indptr.to(device),
            self.indices.to(device),
            self.kv_lens.to(device),
            self.qo_indptr.to(device),
            self.page_size,
        )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_block_table(
        cls,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        page_size: int,
        qo_indptr: torch.Tensor | None = None,
    ) -> "BSR":
        """vLLM: ``block_table[r, j]`` is the j-th page of request r; ``seq_lens[r]`` its KV length.

        Zero-copy when the table is contiguous: row r's pages are the table's row r, so
        ``indptr = r * max_pages`` and ``indices`` is the flattened table.
        """
        if block_table.dim() != 2:
            raise ValueError(f"block_table must be 2-D [requests, pages], got {tuple(block_table.shape)}")
        rows, width = block_table.shape
        if seq_lens.shape != (rows,):
            raise ValueError(f"seq_lens must have shape ({rows},), got {tuple(seq_lens.shape)}")
        device = block_table.device
        indptr = torch.arange(0, (rows + 1) * width, width, dtype=INDEX_DTYPE, device=device)
        indices = _int32(block_table).contiguous().view(-1)
        if qo_indptr is None:
            qo_indptr = torch.arange(rows + 1, dtype=INDEX_DTYPE, device=device)
        return cls(indptr, indices, _int32(seq_lens), _int32(qo_indptr), page_size).validate()

    @classmethod
    def from_token_table(
        cls,
        req_to_token: torch.Tensor,
        req_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        page_size: int = 1,
        qo_indptr: torch.Tensor | None = None,
        capacity: int | None = None,
        out: torch.Tensor | None = None,
    ) -> "BSR":
        """SGLang: ``req_to_token[req_indices[r], t]`` is the KV slot of token t of request r.

        With ``page_size`` P > 1 the slots of a page are contiguous and aligned (SGLang's paged
        allocator), so page ids are ``slot // P`` of every P-th token. The pages are gathered
        into a compact ``indices`` of ``capacity`` entries (default: enough for every request
        at the table's full width; pass the KV pool's page count to bound it), written into
        ``out[:capacity]`` when given (a persistent buffer that captured CUDA graphs read).
        An int32 CUDA table (SGLang's) takes one kernel launch (``token_table``), anything
        else the torch ops below; both give the same arrays.
        """
        if req_to_token.dim() != 2:
            raise ValueError(f"req_to_token must be 2-D [pool rows, tokens], got {tuple(req_to_token.shape)}")
        rows = req_indices.shape[0]
        if seq_lens.shape != (rows,):
            raise ValueError(f"seq_lens must have shape ({rows},), got {tuple(seq_lens.shape)}")
        device = req_to_token.device
        max_pages = -(-req_to_token.shape[1] // page_size)
        if capacity is None:
            capacity = rows * max_pages
        if out is not None and (out.dtype != INDEX_DTYPE or out.dim() != 1 or out.shape[0] < capacity
                                or out.device != device):
            raise ValueError(f"out must be an int32 [>= {capacity}] tensor on {device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        if qo_indptr is None:
            qo_indptr = torch.arange(rows + 1, dtype=INDEX_DTYPE, device=device)
        from . import token_table  # here, not at the top: importing the package must not load the JIT

        if token_table.applies(req_to_token):
            indices = out[:capacity] if out is not None else torch.empty(capacity, dtype=INDEX_DTYPE, device=device)
            indptr, kv_lens = token_table.build(req_to_token, req_indices, seq_lens, page_size, indices)
            return cls(indptr, indices, kv_lens, _int32(qo_indptr), page_size).validate()
        indptr, indices = cls._token_table_ops(req_to_token, req_indices, seq_lens, page_size, capacity)
        if out is not None:
            indices = out[:capacity].copy_(indices)
        return cls(indptr, indices, _int32(seq_lens), _int32(qo_indptr), page_size).validate()

    @staticmethod
    def _token_table_ops(req_to_token, req_indices, seq_lens, page_size: int, capacity: int):
        """``from_token_table``'s (indptr, indices) in torch ops, on any device."""
        rows = req_indices.shape[0]
        device = req_to_token.device
        max_pages = -(-req_to_token.shape[1] // page_size)
        pages = _ceil_div(_int32(seq_lens), page_size)
        indptr = _exclusive_cumsum(pages)
        slot = torch.arange(capacity, dtype=torch.int64, device=device)
        # Row of every output slot; slots past indptr[-1] land on a clamped row and are zeroed.
        row = torch.searchsorted(indptr[1:], slot.to(INDEX_DTYPE), right=True).clamp_(max=max(rows - 1, 0))
        col = (slot - indptr[row]).clamp_(0, max_pages - 1) * page_size
        if rows == 0:
            indices = torch.zeros(capacity, dtype=INDEX_DTYPE, device=device)
        else:
            table_rows = _int32(req_indices).long()[row]
            tokens = req_to_token[table_rows, col.clamp_(max=req_to_token.shape[1] - 1)]
            indices = torch.where(slot < indptr[-1], tokens // page_size, 0).to(INDEX_DTYPE)
        return indptr, indices

    @classmethod
    def from_ragged(
        cls,
        kv_indptr: torch.Tensor,
        num_kv_tokens: int,
        qo_indptr: torch.Tensor | None = None,
    ) -> "BSR":
        """Ragged K/V ``[num_kv_tokens, H, D]`` (new tokens of a prefill): row r owns tokens
        ``kv_indptr[r] : kv_indptr[r + 1]``. Seen as pages of one token whose id is the token
        index, so the K/V tensors are read as ``[num_kv_tokens, 1, H, D]``."""
        kv_indptr = _int32(kv_indptr)
        device = kv_indptr.device
        indices = torch.arange(num_kv_tokens, dtype=INDEX_DTYPE, device=device)
        kv_lens = kv_indptr[1:] - kv_indptr[:-1]
        if qo_indptr is None:
            qo_indptr = kv_indptr
        return cls(kv_indptr, indices, kv_lens, _int32(qo_indptr), 1).validate()

    # ------------------------------------------------------------------- validation
    def validate(self, debug: bool | None = None, num_pages: int | None = None) -> "BSR":
        """Check shapes and dtypes always; values where that costs no device sync (CPU
        tensors) or when ``debug`` (default: env ENGINE_BACKEND_DEBUG) asks for it. With
        ``num_pages``, debug mode also checks that every page id read is in range."""
        debug = _debug_default() if debug is None else debug
        fields = {"indptr": self.indptr, "indices": self.indices, "kv_lens": self.kv_lens, "qo_indptr": self.qo_indptr}
        for name, t in fields.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"BSR.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != INDEX_DTYPE:
                raise ValueError(f"BSR.{name} must be int32, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"BSR.{name} must be 1-D, got shape {tuple(t.shape)}")
            if t.device != self.indptr.device:
                raise ValueError(f"BSR.{name} is on {t.device} but indptr is on {self.indptr.device}")
        rows = self.kv_lens.shape[0]
        if self.indptr.shape[0] != rows + 1 or self.qo_indptr.shape[0] != rows + 1:
            raise ValueError(
                f"BSR with {rows} rows needs indptr and qo_indptr of {rows + 1} entries, "
                f"got {self.indptr.shape[0]} and {self.qo_indptr.shape[0]}"
            )
        if not isinstance(self.page_size, int) or self.page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {self.page_size!r}")
        if debug or self.indptr.device.type == "cpu":
            self._check_values(num_pages if debug else None)
        return self

    def _check_values(self, num_pages: int | None) -> None:
        indptr, qo_indptr, kv_lens = self.indptr.cpu(), self.qo_indptr.cpu(), self.kv_lens.cpu()
        for name, ptr in (("indptr", indptr), ("qo_indptr", qo_indptr)):
            if ptr.numel() and (ptr[0] != 0 or bool((ptr[1:] < ptr[:-1]).any())):
                raise ValueError(f"BSR.{name} must start at 0 and be non-decreasing, got {ptr.tolist()[:16]}...")
        if bool((kv_lens < 0).any()):
            raise ValueError("BSR.kv_lens must be non-negative")
        pages_listed = indptr[1:] - indptr[:-1]
        pages_needed = _ceil_div(kv_lens, self.page_size)
        bad = (pages_needed > pages_listed).nonzero()
        if bad.numel():
            r = int(bad[0])
            raise ValueError(
                f"row {r}: kv_len {int(kv_lens[r])} needs {int(pages_needed[r])} pages of "
                f"{self.page_size} tokens but only {int(pages_listed[r])} are listed"
            )
        if int(indptr[-1]) > self.indices.shape[0]:
            raise ValueError(f"indptr[-1] = {int(indptr[-1])} exceeds len(indices) = {self.indices.shape[0]}")
        if num_pages is not None:
            self._check_page_ids(indptr, pages_needed, num_pages)

    def _check_page_ids(self, indptr: torch.Tensor, pages_needed: torch.Tensor, num_pages: int) -> None:
        indices = self.indices.cpu()
        for r in range(self.num_rows):
            used = indices[int(indptr[r]) : int(indptr[r]) + int(pages_needed[r])]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
                raise ValueError(f"row {r}: page ids {used.tolist()[:16]} out of range [0, {num_pages})")
