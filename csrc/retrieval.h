// Exact blockwise retrieval ranks (docs/method.md, section 5), shared by the CPU and CUDA
// kernels. The driver (cpu/retrieval.cpp) is backend-neutral: it asks a Backend for the
// tile matrix products and for the counting epilogue.
//
// Ranking rule: for a query, item i ranks before item j if s_i > s_j, or s_i == s_j and
// i < j (original indices). For every query we keep its R = min(#relevant, max_r) best
// relevant items, sorted in rank order ("relevant list"); the t-th of them (0-based) has
// 1-based rank t + 1 + #{non-relevant items outranking it}. Relevant items beyond the cap
// rank after all listed ones, so they never change these ranks.
//
// Same-class items are recognised by label in the counting pass and skipped (their order
// is the list's), so no similarity is ever compared with a second computation of itself.
// The listed similarities come from (batched) products of query blocks with their class
// bands, the candidates' from the tiles; both go through the backend's GEMM in the same
// precision. Only an exact duplicate of a relevant item with another label relies on the
// two products rounding alike (MKL does; cuBLAS picks its kernels by shape, and one that
// sums in another order might not, which could move such a tie by one place).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#ifdef __CUDACC__
#define IDML_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IDML_HOST_DEVICE inline
#endif

namespace idml {
namespace retrieval {

// Does a candidate (similarity s, index i) rank before the relevant item (v, j)?
IDML_HOST_DEVICE bool outranks(float s, int32_t i, float v, int32_t j) { return s > v || (s == v && i < j); }

// First position t of a relevant list (length R, in rank order) whose item the candidate
// outranks; R if none. Outranking is monotone along the list, so binary search suffices.
IDML_HOST_DEVICE int32_t first_outranked(const float* values, const int32_t* index, int32_t R, float s, int32_t i) {
  int32_t lo = 0, hi = R;
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (outranks(s, i, values[mid], index[mid])) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Everything the counting epilogue reads and writes, in label-sorted order ("positions").
// Rows are queries, columns references; in symmetric mode (queries are the references)
// both sides point to the same arrays.
struct Lists {
  const float* values;   // [rows, cap] relevant similarities, in rank order
  const int32_t* index;  // [rows, cap] their original reference indices
  const int32_t* limit;  // [rows] ranks above it are not needed: max(R, max_k)
  int32_t* length;       // [rows] listed items still counted (R at first, see shorten)
  float* threshold;      // [rows] similarity of the last counted item (+inf if none)
  int32_t* counts;       // [rows, cap] counts[q][t]: candidates first outranking item t
  int64_t cap;
  const int64_t* row_labels;  // [rows]
  const int64_t* col_labels;  // [cols]
  const int32_t* row_index;   // [rows] original query index of each position
  const int32_t* col_index;   // [cols] original reference index of each position
};

// Ranks only grow as candidates are counted: once listed item t has rank > limit, so have
// all after it, and they need no more counting. Drops them from query q's list and raises
// its threshold accordingly, so fewer candidates pass it. Call while owning query q.
IDML_HOST_DEVICE void shorten(const Lists& l, int64_t q) {
  const int32_t* counts = l.counts + q * l.cap;
  int64_t rank = 0;  // rank of item t = t + 1 + counts[0] + ... + counts[t]
  int32_t t = 0;
  for (; t < l.length[q]; ++t) {
    rank += 1 + counts[t];
    if (rank > l.limit[q]) break;
  }
  if (t < l.length[q]) {
    l.length[q] = t;
    l.threshold[q] = t > 0 ? l.values[q * l.cap + t - 1] : INFINITY;
  }
}

// One tile of the similarity matrix: rows [row0, row0 + rows) x cols [col0, col0 + cols),
// row-major with leading dimension ld >= cols. In symmetric mode only pairs with column
// position > row position are counted, for both of their queries.
struct Tile {
  const float* sim;
  int64_t rows, cols, ld, row0, col0;
  bool symmetric;
};

enum class Precision { FP32, TF32, BF16 };

struct Backend {
  int64_t band_rows;      // queries per block when gathering the relevant lists
  int64_t tile_rows;      // most rows of a similarity tile
  int64_t tile_elements;  // most elements of a tile (and of a chunk of the list gathering)
  // Symmetric mode: the width of the strips that cover a row block's diagonal square, each
  // strip's rows stopping at its last column, so that few products below the diagonal are
  // wasted; 0: the square is in the block's first tile, whose lower half is computed unused.
  int64_t diagonal_cols;
  // Converts float32 rows to what gemm consumes (e.g. bfloat16 in BF16 mode).
  std::function<at::Tensor(const at::Tensor&, Precision)> prepare;
  // out[rows_a, rows_b] (float32, unit column stride) = a @ b^T; batched when all are 3-D.
  std::function<void(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, Precision)> gemm;
  std::function<void(const Tile&, const Lists&)> count;
};

// --- argument checks, shared by the CPU and CUDA kernels (compute_ranks calls them) ---------
// Metadata only (rank, width, dtype, device, layout, ranges); the embeddings' finiteness
// needs their values and is checked in compute_ranks, read back with the class segments
// (no extra host synchronisation).

inline Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::FP32;
  if (name == "tf32") return Precision::TF32;
  if (name == "bf16") return Precision::BF16;
  TORCH_CHECK(false, "retrieval_ranks: precision must be 'fp32', 'tf32' or 'bf16', got '", name, "'");
}

// Rows x (n, d) with d >= 1 and their labels (n), on `device`.
inline void check_rows(const at::Tensor& x, const at::Tensor& labels, const char* what, const at::Device& device) {
  TORCH_CHECK(x.defined() && labels.defined(), "retrieval_ranks: ", what, " or its labels is an undefined tensor");
  TORCH_CHECK(x.layout() == at::kStrided && labels.layout() == at::kStrided, "retrieval_ranks: ", what,
              " and its labels must be dense (strided) tensors");
  TORCH_CHECK(x.dim() == 2, "retrieval_ranks: ", what, " must be 2-D [n, d], got ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, "retrieval_ranks: ", what, " must have at least one column, got ", x.sizes(),
              " (embeddings of width 0 are all equal)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "retrieval_ranks: ", what, " must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "retrieval_ranks: ", what,
              " labels must be 1-D with one label per row, got ", labels.sizes(), " for ", x.size(0), " rows");
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
              "retrieval_ranks: labels must be integers, got ", labels.scalar_type());
  TORCH_CHECK(x.device() == device, "retrieval_ranks: ", what, " must be on the queries' device ", device, ", got ",
              x.device());
  TORCH_CHECK(labels.device() == device, "retrieval_ranks: labels must be on the device of ", what);
  TORCH_CHECK(x.size(0) < std::numeric_limits<int32_t>::max(), "retrieval_ranks: too many rows");
}

inline Precision checked_arguments(const at::Tensor& queries, const at::Tensor& query_labels,
                                   const std::optional<at::Tensor>& references,
                                   const std::optional<at::Tensor>& reference_labels, int64_t max_r, int64_t max_k,
                                   const std::string& precision) {
  const Precision parsed = parse_precision(precision);
  TORCH_CHECK(max_r >= 1 && max_k >= 1, "retrieval_ranks: max_r and max_k must be >= 1, got ", max_r, " and ", max_k);
  TORCH_CHECK(references.has_value() == reference_labels.has_value(),
              "retrieval_ranks: give both references and reference_labels, or neither");
  TORCH_CHECK(queries.defined(), "retrieval_ranks: queries is an undefined tensor");
  check_rows(queries, query_labels, "queries", queries.device());
  if (references.has_value()) {
    check_rows(*references, *reference_labels, "references", queries.device());
    TORCH_CHECK(references->size(1) == queries.size(1), "retrieval_ranks: references must have the queries' width ",
                queries.size(1), ", got ", references->size(1));
  }
  return parsed;
}

// (ranks [n_queries, cap] int64, num_relevant [n_queries] int64), in the callers' order:
// ranks[q][t] = 1-based rank of q's (t+1)-th relevant item for t < R_q, else 0; a rank
// above max(R_q, max_k) (never needed by R@K for K <= max_k, RP, MAP@R) is reported as
// max(R_q, max_k) + 1.
std::tuple<at::Tensor, at::Tensor> compute_ranks(const at::Tensor& queries, const at::Tensor& query_labels,
                                                 const std::optional<at::Tensor>& references,
                                                 const std::optional<at::Tensor>& reference_labels, int64_t max_r,
                                                 int64_t max_k, const std::string& precision, const Backend& backend);

}  // namespace retrieval
}  // namespace idml
