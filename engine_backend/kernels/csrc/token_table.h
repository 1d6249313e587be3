// Host-side interface of the token-table kernel (plain C++, no torch): token_table_ops.cpp calls it.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace eb {

// A read-only array of int32 or int64 values (the engines hand over either).
struct IndexArray {
  const void* data;
  bool is_int64;
};

// SGLang's token table ``table[req[r], t]`` (the KV slot of token t of request r; int32, rows
// ``table_stride`` apart, ``width`` columns) -> the BSR of ``rows`` requests of ``lens[r]`` tokens in
// pages of ``page_size`` slots: indptr[rows + 1], page ids indices[capacity] (``slot / page_size`` of
// every page's first token; zeros past indptr[rows]; ids that would land past capacity are
// dropped) and kv_lens[rows] (int32 copies of lens).
struct TokenTableParams {
  const int32_t* table;
  int64_t table_stride;
  int width;
  IndexArray req, lens;
  int rows, page_size, capacity;
  int32_t* indptr;
  int32_t* indices;
  int32_t* kv_lens;
};

void token_table_launch(const TokenTableParams& p, cudaStream_t stream);

}  // namespace eb
