// Retrieval ranks: the backend-neutral driver (used by the CUDA kernels too) and the CPU
// backend. See retrieval.h for the ranking rule and the meaning of the ranks.
#include "../retrieval.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace idml {
namespace retrieval {

namespace {

// Rows sorted by label (stable, so equal labels keep their original order).
struct Sorted {
  at::Tensor x, labels, order;  // order: original index of each sorted position (int64)
};

Sorted sort_by_label(const at::Tensor& x, const at::Tensor& labels, Precision precision, const Backend& backend) {
  auto [sorted_labels, order] = at::sort(labels.to(at::kLong), /*stable=*/true, 0, false);
  auto rows = x.index_select(0, order).to(at::kFloat).contiguous();
  return {backend.prepare(rows, precision).contiguous(), sorted_labels.contiguous(), order};
}

// Product rows padded to 16 bytes: cuBLAS's fastest kernels need aligned leading dimensions.
int64_t aligned(int64_t floats) { return (floats + 3) / 4 * 4; }

// The size of the near-equal parts that split `total` into parts of at most `most`.
int64_t part_size(int64_t total, int64_t most) {
  const int64_t parts = (total + most - 1) / most;
  return (total + parts - 1) / parts;
}

// The tiles of phase 2 (sim unset): blocks of near-equal rows, each split into column tiles
// of near-equal widths within the backend's budget.
std::vector<Tile> plan_tiles(int64_t nq, int64_t nr, bool symmetric, const Backend& backend) {
  std::vector<Tile> tiles;
  auto add = [&](int64_t a0, int64_t a1, int64_t c0, int64_t c1) {
    const int64_t rows_end = symmetric ? std::min(a1, c1 - 1) : a1;  // rows with a pair above the diagonal
    if (rows_end > a0) tiles.push_back({nullptr, rows_end - a0, c1 - c0, aligned(c1 - c0), a0, c0, symmetric});
  };
  const int64_t block = part_size(nq, backend.tile_rows);
  for (int64_t a0 = 0; a0 < nq; a0 += block) {
    const int64_t a1 = std::min(nq, a0 + block);
    int64_t c0 = symmetric ? a0 : 0;
    if (symmetric && backend.diagonal_cols > 0) {
      for (; c0 < a1; c0 += backend.diagonal_cols) add(a0, a1, c0, std::min(nr, c0 + backend.diagonal_cols));
    }
    if (c0 >= nr) continue;
    const int64_t width = part_size(nr - c0, std::max<int64_t>(1, backend.tile_elements / (a1 - a0)));
    for (; c0 < nr; c0 += width) add(a0, a1, c0, std::min(nr, c0 + width));
  }
  return tiles;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compute_ranks(const at::Tensor& queries, const at::Tensor& query_labels,
                                                 const std::optional<at::Tensor>& references,
                                                 const std::optional<at::Tensor>& reference_labels, int64_t max_r,
                                                 int64_t max_k, const std::string& precision_name,
                                                 const Backend& backend) {
  const Precision precision =
      checked_arguments(queries, query_labels, references, reference_labels, max_r, max_k, precision_name);
  const bool symmetric = !references.has_value();
  const auto device = queries.device();
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);

  const Sorted q = sort_by_label(queries, query_labels, precision, backend);
  const Sorted r = symmetric ? q : sort_by_label(*references, *reference_labels, precision, backend);
  const int64_t nq = q.x.size(0), nr = r.x.size(0);

  // Each query's class occupies positions [begin, end) of the sorted references.
  auto begin = at::searchsorted(r.labels, q.labels, /*out_int32=*/false, /*right=*/false);
  auto end = at::searchsorted(r.labels, q.labels, /*out_int32=*/false, /*right=*/true);
  auto num_relevant = (end - begin - (symmetric ? 1 : 0)).clamp_max(max_r);
  // The class segments on the host, in one transfer (it waits for the device), with whether
  // every row is finite as the GEMM sees it (a NaN would compare false with everything and
  // give plausible but wrong ranks; float64 rows may overflow float32). From the segments:
  // cap, the width of the relevant lists (the largest R, = max(num_relevant)); width, that
  // of the widest segment (phase 1 gathers segments that wide); each block's band.
  auto finite = at::isfinite(q.x).all();
  if (!symmetric) finite = finite.logical_and(at::isfinite(r.x).all());
  const auto bounds_host = at::cat({begin, end, finite.to(at::kLong).view({1})}).cpu();
  const int64_t* begin_ptr = bounds_host.data_ptr<int64_t>();
  const int64_t* end_ptr = begin_ptr + nq;
  TORCH_CHECK(end_ptr[nq] == 1, "retrieval_ranks: ", symmetric ? "queries" : "queries and references",
              " must be finite (as float32), but hold NaN or infinite values");
  int64_t widest = 0;  // the largest class segment
  for (int64_t a = 0; a < nq; ++a) widest = std::max(widest, end_ptr[a] - begin_ptr[a]);
  const int64_t cap = std::min(max_r, std::max<int64_t>(0, widest - (symmetric ? 1 : 0)));  // max R
  const int64_t width = std::max<int64_t>(1, widest);

  auto unsort = [&](const at::Tensor& t) { return at::empty_like(t).index_copy_(0, q.order, t); };
  if (cap == 0) {
    return {at::zeros({nq, 0}, long_opts), unsort(num_relevant)};
  }

  auto float_opts = at::TensorOptions().dtype(at::kFloat).device(device);
  auto values = at::full({nq, cap}, -std::numeric_limits<float>::infinity(), float_opts);
  auto index = at::zeros({nq, cap}, long_opts.dtype(at::kInt));
  auto col_index = r.order.to(at::kInt);
  auto row_index = symmetric ? col_index : q.order.to(at::kInt);

  // Phase 1: each query's class is a contiguous segment of the sorted references, in
  // original index order; a stable sort of its similarities puts it in rank order (equal
  // similarities keep the lower index first). Each block of band_rows queries is
  // multiplied with its band, the references holding all its classes (contiguous, both
  // sides being sorted by label); the bands, cut to one width, are gathered and multiplied
  // in one batched product per chunk of blocks, and everything else runs once per chunk,
  // to keep launches few.
  const int64_t band_rows = backend.band_rows;
  int64_t band_width = 1;
  for (int64_t a0 = 0; a0 < nq; a0 += band_rows) {
    band_width = std::max(band_width, end_ptr[std::min(nq, a0 + band_rows) - 1] - begin_ptr[a0]);
  }
  band_width = aligned(band_width);
  // A chunk's products, segments and gathered bands stay within a tile's budget.
  const int64_t block_elements = band_rows * (band_width + width) + band_width * q.x.size(1);
  const int64_t chunk_rows = std::max<int64_t>(1, backend.tile_elements / block_elements) * band_rows;
  auto offset = at::arange(width, long_opts).unsqueeze(0);
  auto band_offset = at::arange(band_width, long_opts).unsqueeze(0);
  for (int64_t h0 = 0; h0 < nq; h0 += chunk_rows) {
    const int64_t h1 = std::min(nq, h0 + chunk_rows);
    const int64_t blocks = (h1 - h0 + band_rows - 1) / band_rows, padded = blocks * band_rows;
    auto band_begin = begin.slice(0, h0, h1, band_rows);  // [blocks]: each band's first position
    auto bands = r.x.index_select(0, (band_begin.unsqueeze(1) + band_offset).clamp_max_(nr - 1).view(-1));
    auto rows = q.x.slice(0, h0, h1);
    if (padded > h1 - h0) rows = at::constant_pad_nd(rows, {0, 0, 0, padded - (h1 - h0)});
    auto sim = at::empty({blocks, band_rows, band_width}, float_opts);
    backend.gemm(rows.view({blocks, band_rows, -1}), bands.view({blocks, band_width, -1}), sim, precision);
    auto cols = begin.slice(0, h0, h1).unsqueeze(1) + offset;  // reference positions
    // A query is not its own candidate: skipped, not masked, since a masked -inf could tie
    // with (overflowed) -inf similarities of its class and take one of their places.
    if (symmetric) cols += (cols >= at::arange(h0, h1, long_opts).unsqueeze(1)).to(at::kLong);
    auto unused = cols >= end.slice(0, h0, h1).unsqueeze(1);
    cols.clamp_max_(nr - 1);
    // Unused columns may fall outside the band: clamped, then masked.
    auto row_band_begin = band_begin.unsqueeze(1).expand({blocks, band_rows}).reshape({padded, 1}).slice(0, 0, h1 - h0);
    auto band_cols = (cols - row_band_begin).clamp_(0, band_width - 1);
    auto segment = sim.view({padded, band_width}).slice(0, 0, h1 - h0).gather(1, band_cols);
    segment.masked_fill_(unused, -std::numeric_limits<float>::infinity());
    auto [sorted_sim, order] = at::sort(segment, /*stable=*/true, 1, /*descending=*/true);
    values.slice(0, h0, h1).slice(1, 0, cap).copy_(sorted_sim.slice(1, 0, cap));
    auto best_cols = cols.gather(1, order.slice(1, 0, cap)).reshape({-1});
    index.slice(0, h0, h1).slice(1, 0, cap).copy_(col_index.index_select(0, best_cols).view({h1 - h0, cap}));
  }
  auto length = num_relevant.to(at::kInt).contiguous();
  auto limit = num_relevant.clamp_min(std::min<int64_t>(max_k, nr)).to(at::kInt).contiguous();
  auto threshold =
      at::where(num_relevant > 0, values.gather(1, (num_relevant - 1).clamp_min(0).unsqueeze(1)).squeeze(1),
                at::full({}, std::numeric_limits<float>::infinity(), float_opts))
          .contiguous();

  // Phase 2: one pass over the similarity matrix in tiles (the upper triangle only in
  // symmetric mode); the epilogue counts the non-relevant items outranking each listed one.
  auto counts = at::zeros({nq, cap}, long_opts.dtype(at::kInt));
  const Lists lists{values.data_ptr<float>(),
                    index.data_ptr<int32_t>(),
                    limit.data_ptr<int32_t>(),
                    length.data_ptr<int32_t>(),
                    threshold.data_ptr<float>(),
                    counts.data_ptr<int32_t>(),
                    cap,
                    q.labels.data_ptr<int64_t>(),
                    r.labels.data_ptr<int64_t>(),
                    row_index.data_ptr<int32_t>(),
                    col_index.data_ptr<int32_t>()};
  const std::vector<Tile> tiles = plan_tiles(nq, nr, symmetric, backend);
  int64_t buffer_size = 0;
  for (const Tile& tile : tiles) buffer_size = std::max(buffer_size, tile.rows * tile.ld);
  auto buffer = at::empty({buffer_size}, float_opts);
  for (Tile tile : tiles) {
    auto sim = buffer.narrow(0, 0, tile.rows * tile.ld).view({tile.rows, tile.ld}).narrow(1, 0, tile.cols);
    backend.gemm(q.x.slice(0, tile.row0, tile.row0 + tile.rows), r.x.slice(0, tile.col0, tile.col0 + tile.cols), sim,
                 precision);
    tile.sim = sim.data_ptr<float>();
    backend.count(tile, lists);
  }

  // rank of listed item t = t + 1 + #non-relevant items outranking it; items dropped
  // from the counting (t >= length) and any rank above the limit become limit + 1.
  auto position = at::arange(cap, long_opts).unsqueeze(0);
  auto above = (limit + 1).to(at::kLong).unsqueeze(1);
  auto ranks = counts.to(at::kLong).cumsum(1).add_(position + 1);
  ranks = at::where((position >= length.unsqueeze(1)) | (ranks > above), above, ranks);
  ranks.masked_fill_(position >= num_relevant.unsqueeze(1), 0);
  return {unsort(ranks), unsort(num_relevant)};
}

}  // namespace retrieval

namespace {

using retrieval::Lists;
using retrieval::Precision;
using retrieval::Tile;

// Candidate (similarity s, original index i, label) for the query at position q.
inline void count_candidate(const Lists& l, int64_t q, float s, int32_t i, int64_t label) {
  if (label == l.row_labels[q]) return;  // relevant items are ordered by their list
  const int32_t length = l.length[q];
  const int32_t t = retrieval::first_outranked(l.values + q * l.cap, l.index + q * l.cap, length, s, i);
  if (t < length) ++l.counts[q * l.cap + t];
}

// Calls visit(c) for every c in [begin, end) with sim[c] >= threshold[c]. Almost no
// element passes, so blocks of 64 are first tested branch-free (this loop vectorises).
template <typename Threshold, typename Visit>
inline void for_each_passing(const float* sim, Threshold threshold, int64_t begin, int64_t end, Visit visit) {
  constexpr int64_t kBlock = 64;
  int64_t c = begin;
  for (; c + kBlock <= end; c += kBlock) {
    int any = 0;
    for (int64_t j = 0; j < kBlock; ++j) any |= sim[c + j] >= threshold[c + j];
    if (!any) continue;
    for (int64_t j = 0; j < kBlock; ++j) {
      if (sim[c + j] >= threshold[c + j]) visit(c + j);
    }
  }
  for (; c < end; ++c) {
    if (sim[c] >= threshold[c]) visit(c);
  }
}

// A threshold array that is one value everywhere (the row side's single query).
struct Broadcast {
  float value;
  float operator[](int64_t) const { return value; }
};

void count_cpu(const Tile& tile, const Lists& l) {
  // Query = row: each thread owns whole rows, hence their counters.
  at::parallel_for(0, tile.rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t q = tile.row0 + r;
      retrieval::shorten(l, q);
      if (l.length[q] == 0) continue;
      const int64_t c_begin = tile.symmetric ? std::max<int64_t>(0, q + 1 - tile.col0) : 0;
      for_each_passing(tile.sim + r * tile.ld, Broadcast{l.threshold[q]}, c_begin, tile.cols, [&](int64_t c) {
        const int64_t i = tile.col0 + c;
        count_candidate(l, q, tile.sim[r * tile.ld + c], l.col_index[i], l.col_labels[i]);
      });
    }
  });
  if (!tile.symmetric) return;
  // Query = column (the same pair seen from its other side): threads own column ranges.
  // In symmetric mode rows and columns share the position arrays, so count_candidate
  // indexed by the column's position is right.
  at::parallel_for(0, tile.cols, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) retrieval::shorten(l, tile.col0 + c);
    for (int64_t r = 0; r < tile.rows; ++r) {
      const int64_t q = tile.row0 + r;
      const float* sim = tile.sim + r * tile.ld;
      for_each_passing(sim, l.threshold + tile.col0, std::max<int64_t>(c0, q + 1 - tile.col0), c1,
                       [&](int64_t c) { count_candidate(l, tile.col0 + c, sim[c], l.row_index[q], l.row_labels[q]); });
    }
  });
}

// CPU: TF32 has no meaning, so it is exact FP32; BF16 rounds the inputs to bfloat16 and
// multiplies them in float32 (bf16 x bf16 products are exact in float32), which is what a
// bf16 tensor-core GEMM with float32 accumulation computes, without its speed.
retrieval::Backend cpu_backend() {
  retrieval::Backend backend;
  // A band also covers its block's own rows (products wasted): small blocks, all those of
  // a chunk in one batched product.
  backend.band_rows = 256;
  // Large tiles keep MKL's packing overhead small; 64 MiB is still O(tile x n). Narrow
  // strips across the diagonal: on a CPU every wasted product costs its full time.
  backend.tile_rows = 4096;
  backend.tile_elements = 4096 * 4096;
  backend.diagonal_cols = 1024;
  backend.prepare = [](const at::Tensor& x, Precision p) {
    return p == Precision::BF16 ? x.to(at::kBFloat16).to(at::kFloat) : x;
  };
  backend.gemm = [](const at::Tensor& a, const at::Tensor& b, at::Tensor& out, Precision) {
    a.dim() == 3 ? at::bmm_out(out, a, b.transpose(1, 2)) : at::mm_out(out, a, b.t());
  };
  backend.count = count_cpu;
  return backend;
}

std::tuple<at::Tensor, at::Tensor> retrieval_ranks_cpu(const at::Tensor& queries, const at::Tensor& query_labels,
                                                       const std::optional<at::Tensor>& references,
                                                       const std::optional<at::Tensor>& reference_labels, int64_t max_r,
                                                       int64_t max_k, c10::string_view precision) {
  static const retrieval::Backend backend = cpu_backend();
  return retrieval::compute_ranks(queries, query_labels, references, reference_labels, max_r, max_k,
                                  std::string(precision), backend);
}

}  // namespace
}  // namespace idml

TORCH_LIBRARY_IMPL(idml, CPU, m) { m.impl("retrieval_ranks", &idml::retrieval_ranks_cpu); }
