"""Block-sparse-row (BSR) view of a KV cache: the one format every kernel reads.

A *row* is a group of query tokens (normally one request's); a *column block* is a KV page
of ``page_size`` tokens. Row ``r``:

* queries: ``q[qo_indptr[r] : qo_indptr[r + 1]]``;
* KV: the first ``kv_lens[r]`` tokens of the pages ``indices[indptr[r] : indptr[r + 1]]``,
  taken in that order. A row may list more pages than it uses (a padded row of a dense page
  table, say); only ``ceil(kv_lens[r] / page_size)`` of them are read, so the last page used is
  the only partially filled block.

Query ``i`` of row ``r`` sits at position ``kv_lens[r] - q_len + i`` of the row's KV (the
queries are the newest tokens), which is what the causal mask and position-dependent
variants use.

``indices`` may be longer than ``indptr[-1]`` (fixed-capacity buffers, filled without a
device-to-host sync); entries past ``indptr[-1]`` are never read.

Constructors, one per shape of engine-side page data; each accepts int32 or int64 tensors:

* ``from_block_table``: a dense page table ``[rows, width]`` (vLLM's block table, say);
* ``from_token_table``: a token-to-slot table read through per-row indices (SGLang's
  ``req_to_token``, say);
* ``from_ragged``: new K/V packed by row, as pages of one token.

``lengths_to_indptr`` turns per-row counts into row pointers for any of them.

Every constructor runs on CPU or GPU tensors and never synchronizes with the device: they run
inside the engines' per-step metadata builders and CUDA-graph capture. Shapes and dtypes are
always checked; values (lengths, page ids) on CPU tensors always and on device tensors in debug
mode only (``ENGINE_BACKEND_DEBUG=1``, see ``checks``), where ``num_pages`` (the KV pool's page
count) also bounds the page ids read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import as_int, integer_tensor, values_checked

INDEX_DTYPE = torch.int32
INDEX_MAX = torch.iinfo(INDEX_DTYPE).max


def _int32(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` as int32, refusing values an int32 cannot hold (the cast would wrap them) where values
    are checked (see ``checks.values_checked``)."""
    if x.dtype == INDEX_DTYPE:
        return x
    if values_checked(x) and x.numel() and (int(x.min()) < -INDEX_MAX - 1 or int(x.max()) > INDEX_MAX):
        raise ValueError(f"{name} holds values outside the int32 range that page ids, lengths and offsets use "
                         f"(min {int(x.min())}, max {int(x.max())})")
    return x.to(INDEX_DTYPE)


def lengths_to_indptr(lens: torch.Tensor) -> torch.Tensor:
    """Row pointers of rows of ``lens[r]`` entries: int32 ``[n + 1]``, ``0, lens[0], lens[0] + lens[1],
    ...`` (the exclusive cumulative sum). ``lens``: an int32 or int64 ``[n]`` on any device; one
    allocation and one launch, no device sync."""
    integer_tensor("lens", lens, 1)
    if values_checked(lens) and lens.numel():
        if int(lens.min()) < 0:
            raise ValueError(f"lengths must be non-negative, got {lens.tolist()[:16]}")
        if int(lens.sum(dtype=torch.int64)) > INDEX_MAX:
            raise ValueError(f"lengths sum to {int(lens.sum(dtype=torch.int64))}, past the int32 range of row pointers")
    out = torch.zeros(lens.shape[0] + 1, dtype=INDEX_DTYPE, device=lens.device)
    torch.cumsum(lens if lens.dtype == INDEX_DTYPE else lens.to(INDEX_DTYPE), dim=0, out=out[1:])
    return out


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x + (d - 1), d, rounding_mode="floor")


def _same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the page table on {device}")


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
        table: torch.Tensor,
        kv_lens: torch.Tensor,
        page_size: int,
        qo_indptr: torch.Tensor | None = None,
        *,
        indptr: torch.Tensor | None = None,
        num_pages: int | None = None,
    ) -> "BSR":
        """A dense page table: ``table[r, j]`` is the j-th KV page of row r and ``kv_lens[r]`` the
        row's KV length; entries past a row's ``ceil(kv_lens[r] / page_size)`` pages are padding,
        never read (vLLM's block table is such a table, and so is any engine's ``[rows, width]``
        page table).

        Row r's pages are the table's row r, so ``indptr`` is ``0, w, 2w, ..., rows * w`` (``w``
        the table's width) and ``indices`` the flattened table: the table's own storage when it is
        int32 and contiguous (zero-copy, so a CUDA-graph replay reads the engine's table as it is),
        an int32 copy otherwise. ``indptr``, when given, is those row pointers precomputed (int32
        ``[rows + 1]``, e.g. a slice of a persistent arange), so that a caller under CUDA graphs
        allocates nothing. ``qo_indptr`` defaults to one query per row (decode). ``num_pages``,
        the KV pool's page count, bounds the page ids read (see ``validate``).
        """
        integer_tensor("table", table, 2)
        integer_tensor("kv_lens", kv_lens, 1)
        page_size = as_int("page_size", page_size, minimum=1)
        rows, width = table.shape
        if kv_lens.shape != (rows,):
            raise ValueError(f"kv_lens must have shape ({rows},), one length per table row, got {tuple(kv_lens.shape)}")
        if rows * width > INDEX_MAX:
            raise ValueError(f"a page table of {rows} x {width} entries is past the int32 range of row pointers")
        device = table.device
        if indptr is None:
            indptr = torch.arange(0, (rows + 1) * width, width, dtype=INDEX_DTYPE, device=device)
        else:
            integer_tensor("indptr", indptr, 1)
            if indptr.dtype != INDEX_DTYPE or indptr.shape != (rows + 1,):
                raise ValueError(f"indptr must be int32 [{rows + 1}], got {indptr.dtype} {tuple(indptr.shape)}")
            if values_checked(indptr) and not torch.equal(
                indptr.cpu(), torch.arange(0, (rows + 1) * width, width, dtype=INDEX_DTYPE)
            ):
                raise ValueError(f"indptr must be 0, {width}, ..., {rows * width} (the table's width is {width}), "
                                 f"got {indptr.tolist()[:16]}")
        if qo_indptr is None:
            qo_indptr = torch.arange(rows + 1, dtype=INDEX_DTYPE, device=device)
        else:
            integer_tensor("qo_indptr", qo_indptr, 1)
        _same_device(device, kv_lens=kv_lens, indptr=indptr, qo_indptr=qo_indptr)
        indices = _int32("table", table).contiguous().view(-1)
        bsr = cls(indptr, indices, _int32("kv_lens", kv_lens), _int32("qo_indptr", qo_indptr), page_size)
        return bsr.validate(num_pages=num_pages)

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
        *,
        num_pages: int | None = None,
    ) -> "BSR":
        """A token table: ``req_to_token[req_indices[r], t]`` is the KV slot of token t of row r and
        ``seq_lens[r]`` the row's KV length, at most the table's width (SGLang's ``req_to_token``
        pool is such a table).

        With ``page_size`` P > 1 the slots of a page are contiguous and aligned (token t of a page
        in slot ``page * P + t % P``, as a paged allocator hands them out), so page ids are
        ``slot // P`` of every P-th token. The pages are gathered into a compact ``indices`` of
        ``capacity`` entries (default: enough for every row at the table's full width; the batch's
        page count is the tightest), zeros after the last page listed. ``out``, an int32 buffer of
        at least ``capacity`` entries, receives them in its first ``capacity`` entries and is then
        the BSR's ``indices`` itself (a persistent buffer that captured CUDA graphs read keeps its
        storage). ``num_pages``, the KV pool's page count, bounds the page ids read (see
        ``validate``). An int32 CUDA table takes one kernel launch (``token_table``), anything
        else the torch ops below; both give the same arrays.
        """
        integer_tensor("req_to_token", req_to_token, 2)
        integer_tensor("req_indices", req_indices, 1)
        integer_tensor("seq_lens", seq_lens, 1)
        page_size = as_int("page_size", page_size, minimum=1)
        rows = req_indices.shape[0]
        if seq_lens.shape != (rows,):
            raise ValueError(f"seq_lens must have shape ({rows},), one length per request index, "
                             f"got {tuple(seq_lens.shape)}")
        device = req_to_token.device
        if qo_indptr is None:
            qo_indptr = torch.arange(rows + 1, dtype=INDEX_DTYPE, device=device)
        else:
            integer_tensor("qo_indptr", qo_indptr, 1)
        _same_device(device, req_indices=req_indices, seq_lens=seq_lens, qo_indptr=qo_indptr)
        max_pages = -(-req_to_token.shape[1] // page_size)
        capacity = rows * max_pages if capacity is None else as_int("capacity", capacity, minimum=0)
        if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != INDEX_DTYPE or out.dim() != 1
                                or out.shape[0] < capacity or out.device != device):
            got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be an int32 [>= {capacity}] tensor on {device}, got {got}")
        if values_checked(req_to_token, req_indices, seq_lens):
            _check_token_table(req_to_token, req_indices, seq_lens, page_size)
        from . import token_table  # here, not at the top: importing the package must not load the JIT

        if token_table.applies(req_to_token):
            indices = out[:capacity] if out is not None else torch.empty(capacity, dtype=INDEX_DTYPE, device=device)
            indptr, kv_lens = token_table.build(req_to_token, req_indices, seq_lens, page_size, indices)
        else:
            indptr, indices = cls._token_table_ops(req_to_token, req_indices, seq_lens, page_size, capacity)
            kv_lens = _int32("seq_lens", seq_lens)
            if out is not None:
                out[:capacity].copy_(indices)
        if values_checked(indptr) and int(indptr[-1]) > capacity:
            raise ValueError(f"the rows list {int(indptr[-1])} pages but capacity is {capacity}")
        bsr = cls(indptr, out if out is not None else indices, kv_lens, _int32("qo_indptr", qo_indptr), page_size)
        return bsr.validate(num_pages=num_pages)

    @staticmethod
    def _token_table_ops(req_to_token, req_indices, seq_lens, page_size: int, capacity: int):
        """``from_token_table``'s (indptr, indices) in torch ops, on any device."""
        rows = req_indices.shape[0]
        device = req_to_token.device
        max_pages = -(-req_to_token.shape[1] // page_size)
        pages = _ceil_div(_int32("seq_lens", seq_lens), page_size)
        indptr = lengths_to_indptr(pages)
        slot = torch.arange(capacity, dtype=torch.int64, device=device)
        # Row of every output slot; slots past indptr[-1] land on a clamped row and are zeroed.
        row = torch.searchsorted(indptr[1:], slot.to(INDEX_DTYPE), right=True).clamp_(max=max(rows - 1, 0))
        col = (slot - indptr[row]).clamp_(0, max_pages - 1) * page_size
        if rows == 0:
            indices = torch.zeros(capacity, dtype=INDEX_DTYPE, device=device)
        else:
            table_rows = req_indices.long()[row]
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
        integer_tensor("kv_indptr", kv_indptr, 1)
        if kv_indptr.shape[0] == 0:
            raise ValueError("kv_indptr needs rows + 1 entries, got none")
        num_kv_tokens = as_int("num_kv_tokens", num_kv_tokens, minimum=0)
        if num_kv_tokens > INDEX_MAX:
            raise ValueError(f"num_kv_tokens = {num_kv_tokens} is past the int32 range of token indices")
        kv_indptr = _int32("kv_indptr", kv_indptr)
        device = kv_indptr.device
        if qo_indptr is None:
            qo_indptr = kv_indptr
        else:
            integer_tensor("qo_indptr", qo_indptr, 1)
        _same_device(device, qo_indptr=qo_indptr)
        indices = torch.arange(num_kv_tokens, dtype=INDEX_DTYPE, device=device)
        kv_lens = kv_indptr[1:] - kv_indptr[:-1]
        return cls(kv_indptr, indices, kv_lens, _int32("qo_indptr", qo_indptr), 1).validate()

    # ------------------------------------------------------------------- validation
    def validate(self, debug: bool | None = None, num_pages: int | None = None) -> "BSR":
        """Check shapes and dtypes always; values where that costs no device sync (CPU tensors)
        or when ``debug`` (default: env ENGINE_BACKEND_DEBUG) asks for it: row pointers, lengths,
        and the page ids each row reads (non-negative, and below ``num_pages``, the KV pool's page
        count, when given)."""
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
        self.page_size = as_int("page_size", self.page_size, minimum=1)
        if num_pages is not None:
            num_pages = as_int("num_pages", num_pages, minimum=0)
        if values_checked(self.indptr, debug=debug):
            self._check_values(num_pages)
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
        self._check_page_ids(indptr, pages_needed, num_pages)

    def _check_page_ids(self, indptr: torch.Tensor, pages_needed: torch.Tensor, num_pages: int | None) -> None:
        """The page ids the rows read (not the padding after them) are in ``[0, num_pages)``."""
        needed = pages_needed.long()
        row = torch.repeat_interleave(torch.arange(self.num_rows), needed)
        first_read = torch.cumsum(needed, 0) - needed  # index into the read pages of each row's first one
        position = indptr[row].long() + torch.arange(row.shape[0]) - first_read[row]
        ids = self.indices[position.to(self.indices.device)].cpu()
        bad = (ids < 0) if num_pages is None else (ids < 0) | (ids >= num_pages)
        if bool(bad.any()):
            r = int(row[bad.nonzero()[0, 0]])
            used = self.indices[int(indptr[r]) : int(indptr[r]) + int(needed[r])].tolist()
            bounds = "negative" if num_pages is None else f"out of range [0, {num_pages})"
            raise ValueError(f"row {r}: page ids {used[:16]} {bounds}")


def _check_token_table(req_to_token, req_indices, seq_lens, page_size: int) -> None:
    """The values ``from_token_table`` relies on: request indices within the table, lengths
    within its width, slots non-negative and, with pages of several tokens, contiguous and
    aligned within each page."""
    pool_rows, width = req_to_token.shape
    req, lens = req_indices.cpu().long(), seq_lens.cpu().long()
    if not req.numel():
        return
    for what, bad in (("is negative", lens < 0), (f"exceeds the table's width of {width} tokens", lens > width)):
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"seq_lens[{r}] = {int(lens[r])} {what}")
    bad = (req < 0) | (req >= pool_rows)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"req_indices[{r}] = {int(req[r])} is not a row of the table (it has {pool_rows} rows)")
    span = int(lens.max())
    slots = req_to_token[req_indices.long()][:, :span].cpu().long()  # only the rows and columns read
    t = torch.arange(span)
    read = t[None, :] < lens[:, None]
    if bool((read & (slots < 0)).any()):
        r, c = (read & (slots < 0)).nonzero()[0].tolist()
        raise ValueError(f"request {r}: token {c} has the negative slot {int(slots[r, c])}")
    if bool((read & (slots // page_size > INDEX_MAX)).any()):
        raise ValueError(f"slots of {req_to_token.dtype} table give page ids past the int32 range")
    if page_size > 1:
        page_start = (slots[:, ::page_size] // page_size * page_size).repeat_interleave(page_size, dim=1)[:, :span]
        misplaced = read & (slots != page_start + t % page_size)
        if bool(misplaced.any()):
            r, c = misplaced.nonzero()[0].tolist()
            raise ValueError(
                f"request {r}: token {c} is in slot {int(slots[r, c])}, not {int(page_start[r, c] + c % page_size)}: "
                f"with page_size {page_size} the slots of a page must be contiguous, starting at a multiple of "
                f"{page_size}"
            )
