// Retrieval ranks on CUDA: the driver of cpu/retrieval.cpp with cuBLAS tile products
// (through ATen) and a counting epilogue kernel. See retrieval.h.
#include "../retrieval.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/version.h>

namespace idml {
namespace {

using retrieval::Lists;
using retrieval::Precision;
using retrieval::Tile;

constexpr int kThreads = 256;      // one thread per tile column
constexpr int kRowsPerBlock = 16;  // rows each thread walks down
static_assert(kRowsPerBlock <= 32, "count_kernel keeps one bit per row in a uint32_t");

__device__ __forceinline__ void count_candidate(const Lists& l, int64_t q, float s, int32_t i) {
  const int32_t length = l.length[q];
  const int32_t t = retrieval::first_outranked(l.values + q * l.cap, l.index + q * l.cap, length, s, i);
  if (t < length) atomicAdd(l.counts + q * l.cap + t, 1);
}

// Before a tile is counted, each of its queries drops the listed items already ranked
// past its limit (retrieval::shorten, as the CPU kernel does) and so raises its threshold:
// fewer candidates pass, fewer searches and atomics. One thread per query: the tile's rows
// and, in symmetric mode, its columns outside the rows' range.
__global__ void shorten_kernel(Tile tile, Lists l) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k < tile.rows) {
    retrieval::shorten(l, tile.row0 + k);
    return;
  }
  const int64_t i = tile.col0 + (k - tile.rows);
  if (tile.symmetric && k - tile.rows < tile.cols && (i < tile.row0 || i >= tile.row0 + tile.rows)) {
    retrieval::shorten(l, i);
  }
}

// Each element (q, i) of the tile is a candidate for query q and, in symmetric mode, q a
// candidate for query i. The thresholds reject almost every element before any search, so
// the kernel streams the tile: a thread first tests all its elements, their loads in flight
// together (the atomics of a counting loop would otherwise hold each load back until the
// previous element was counted), then counts the few that passed.
__global__ void count_kernel(Tile tile, Lists l) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= tile.cols) return;
  const int64_t i = tile.col0 + c;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  // Symmetric mode: only rows q < i, above the diagonal.
  const int64_t r_end = min(min(tile.rows, r_begin + kRowsPerBlock), tile.symmetric ? i - tile.row0 : tile.rows);
  if (r_end <= r_begin) return;
  const float* sim = tile.sim + r_begin * tile.ld + c;
  const float* row_threshold = l.threshold + tile.row0 + r_begin;
  // Column i is a query only in symmetric mode; elsewhere its threshold, +inf, would still
  // pass a similarity of +inf (overflowing embeddings) and index the queries' lists by i.
  const float col_threshold = tile.symmetric ? l.threshold[i] : INFINITY;
  uint32_t passed = 0;
#pragma unroll
  for (int k = 0; k < kRowsPerBlock; ++k) {
    if (r_begin + k < r_end) {
      const float s = sim[k * tile.ld];
      if (s >= row_threshold[k] || (tile.symmetric && s >= col_threshold)) passed |= 1u << k;
    }
  }
  if (passed == 0) return;
  const int64_t col_label = l.col_labels[i];
  const int32_t col_index = l.col_index[i];
  for (int k = 0; passed != 0; ++k, passed >>= 1) {
    if ((passed & 1) == 0) continue;
    const int64_t q = tile.row0 + r_begin + k;
    if (col_label == l.row_labels[q]) continue;  // relevant items are ordered by their list
    const float s = sim[k * tile.ld];
    if (s >= l.threshold[q]) count_candidate(l, q, s, col_index);
    if (tile.symmetric && s >= col_threshold) count_candidate(l, i, s, l.row_index[q]);
  }
}

void count_cuda(const Tile& tile, const Lists& l) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t queries = tile.rows + (tile.symmetric ? tile.cols : 0);
  shorten_kernel<<<(queries + kThreads - 1) / kThreads, kThreads, 0, stream>>>(tile, l);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid((tile.cols + kThreads - 1) / kThreads, (tile.rows + kRowsPerBlock - 1) / kRowsPerBlock);
  count_kernel<<<grid, kThreads, 0, stream>>>(tile, l);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sets cuBLAS's TF32 permission for one product and restores the caller's setting, so
// FP32 mode is exact even when the user enabled TF32 globally. Only a setting that differs
// is written: the getters return the effective value, and writing it back would pin what
// the user left to follow a global default (torch.backends.fp32_precision).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
// cuBLAS reads float32Precision(CUDA, MATMUL), and only that is touched. The legacy getter
// allowTF32CuBLAS() throws once TF32 was set through the new API alone
// (torch.backends.cuda.matmul.fp32_precision = "tf32"), and the legacy setter also resets
// the legacy matmul precision ("medium" would come back as "high", and from then on
// torch.get_float32_matmul_precision() throws).
class AllowTF32 {
 public:
  explicit AllowTF32(bool allow)
      : previous_(get()), wanted_(allow ? at::Float32Precision::TF32 : at::Float32Precision::IEEE) {
    if (changes()) set(wanted_);
  }
  ~AllowTF32() {
    if (changes()) set(previous_);
  }

 private:
  static at::Float32Precision get() {
    return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
  }
  static void set(at::Float32Precision precision) {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, precision);
  }
  // Anything but TF32 ("ieee", or "none" resolved to it) multiplies exactly in float32.
  bool changes() const { return (previous_ == at::Float32Precision::TF32) != (wanted_ == at::Float32Precision::TF32); }
  at::Float32Precision previous_, wanted_;
};
#else  // older torch: the legacy flag, there also what cuBLAS reads
class AllowTF32 {
 public:
  explicit AllowTF32(bool allow) : previous_(at::globalContext().allowTF32CuBLAS()), allow_(allow) {
    if (previous_ != allow_) at::globalContext().setAllowTF32CuBLAS(allow_);
  }
  ~AllowTF32() {
    if (previous_ != allow_) at::globalContext().setAllowTF32CuBLAS(previous_);
  }

 private:
  bool previous_, allow_;
};
#endif

retrieval::Backend cuda_backend() {
  retrieval::Backend backend;
  // Few, large launches: at CUB size (n = 5924) the host's launches set the pace (an H100
  // profile of 2048 x 16384 tiles with 512-wide diagonal strips: 14 tiles, device idle over
  // half the time), and at SOP size (n = 60502) the narrow strips' products ran far below
  // cuBLAS's peak. With 256 MiB tiles (memory still O(tile x n)) and each row block's
  // diagonal square in its first tile (the lower half's products unused, cheaper than more
  // launches), CUB size takes 3 tiles and SOP size 44.
  backend.band_rows = 256;
  backend.tile_rows = 2048;
  backend.tile_elements = int64_t{1} << 26;
  backend.diagonal_cols = 0;
  backend.prepare = [](const at::Tensor& x, Precision p) { return p == Precision::BF16 ? x.to(at::kBFloat16) : x; };
  backend.gemm = [](const at::Tensor& a, const at::Tensor& b, at::Tensor& out, Precision p) {
    const bool batched = a.dim() == 3;
    const at::Tensor bt = batched ? b.transpose(1, 2) : b.t();
    if (p == Precision::BF16) {  // bf16 inputs, float32 accumulation and output
      batched ? at::bmm_out(out, a, bt, at::kFloat) : at::mm_out(out, a, bt, at::kFloat);
    } else {
      AllowTF32 guard(p == Precision::TF32);
      batched ? at::bmm_out(out, a, bt) : at::mm_out(out, a, bt);
    }
  };
  backend.count = count_cuda;
  return backend;
}

std::tuple<at::Tensor, at::Tensor> retrieval_ranks_cuda(const at::Tensor& queries, const at::Tensor& query_labels,
                                                        const std::optional<at::Tensor>& references,
                                                        const std::optional<at::Tensor>& reference_labels,
                                                        int64_t max_r, int64_t max_k, c10::string_view precision) {
  // Optional: a CPU tensor among CUDA ones (dispatched here) reaches compute_ranks's
  // device checks and their message instead of the guard's.
  const c10::OptionalDeviceGuard device_guard(queries.device());
  static const retrieval::Backend backend = cuda_backend();
  return retrieval::compute_ranks(queries, query_labels, references, reference_labels, max_r, max_k,
                                  std::string(precision), backend);
}

}  // namespace
}  // namespace idml

TORCH_LIBRARY_IMPL(idml, CUDA, m) { m.impl("retrieval_ranks", &idml::retrieval_ranks_cuda); }
