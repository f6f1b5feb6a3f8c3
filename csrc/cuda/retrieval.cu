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

constexpr int kThreads = 256;     // one thread per tile column
constexpr int kRowsPerBlock = 16;  // rows each thread walks down

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
// candidate for query i. The thresholds reject almost every element before any search.
__global__ void count_kernel(Tile tile, Lists l) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= tile.cols) return;
  const int64_t i = tile.col0 + c;
  const int64_t col_label = l.col_labels[i];
  const int32_t col_index = l.col_index[i];
  const float col_threshold = tile.symmetric ? l.threshold[i] : INFINITY;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  const int64_t r_end = min(tile.rows, r_begin + kRowsPerBlock);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t q = tile.row0 + r;
    if (tile.symmetric && i <= q) continue;
    const float s = tile.sim[r * tile.cols + c];
    const bool row_side = s >= l.threshold[q];
    // Column i is a query only in symmetric mode; elsewhere its threshold, +inf, would still
    // pass a similarity of +inf (overflowing embeddings) and index the queries' lists by i.
    const bool col_side = tile.symmetric && s >= col_threshold;
    if ((row_side || col_side) && col_label != l.row_labels[q]) {
      if (row_side) count_candidate(l, q, s, col_index);
      if (col_side) count_candidate(l, i, s, l.row_index[q]);
    }
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
  // A 2048 x 16384 float32 tile (128 MiB) keeps cuBLAS near peak on H100-class GPUs.
  backend.band_rows = 2048;  // few launches per block matter more than the band square
  backend.tile_rows = 2048;
  backend.tile_cols = 16384;
  backend.prepare = [](const at::Tensor& x, Precision p) {
    return p == Precision::BF16 ? x.to(at::kBFloat16) : x;
  };
  backend.gemm = [](const at::Tensor& a, const at::Tensor& b, at::Tensor& out, Precision p) {
    if (p == Precision::BF16) {
      at::mm_out(out, a, b.t(), at::kFloat);  // bf16 inputs, float32 accumulation and output
    } else {
      AllowTF32 guard(p == Precision::TF32);
      at::mm_out(out, a, b.t());
    }
  };
  backend.count = count_cuda;
  return backend;
}

std::tuple<at::Tensor, at::Tensor> retrieval_ranks_cuda(
    const at::Tensor& queries, const at::Tensor& query_labels,
    const std::optional<at::Tensor>& references, const std::optional<at::Tensor>& reference_labels,
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

TORCH_LIBRARY_IMPL(idml, CUDA, m) {
  m.impl("retrieval_ranks", &idml::retrieval_ranks_cuda);
}
