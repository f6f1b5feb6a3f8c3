// CUDA kernels of the introspective Proxy Anchor loss: float32, bfloat16 and float16 inputs
// (float64 too), float32 accumulation, everything on the current stream, no host sync.
//
// Forward: squared row norms (one block per row); dots = mu P^T through ATen (cuBLAS; half
// inputs give a float32 product through at::mm's out_dtype); then ONE column kernel: one
// block per 32 proxy columns, lanes along the columns (coalesced rows of the B x C matrix),
// warps splitting the B rows (their per-row values staged in shared memory, see RowTable).
// It computes its proxies' squared norms, sI and the online positive and negative
// log-sum-exp of each column, and the block's share of the loss; a one-block kernel sums
// the shares in a fixed order (loss and |P+| stay on the device).
// Backward: ONE column kernel of the same shape writes the B x C coefficient matrix
// dL/d(dots), each block's per-row norm terms and grad_P's norm term; a row kernel sums
// the per-row terms into grad_mu's norm term and grad_sigma; two addmm_ finish.
// The element math is csrc/pa_ism.h, shared with the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../pa_ism.h"

namespace idml {
namespace {

using pa_ism::Col;
using pa_ism::Params;
using pa_ism::Row;

constexpr int kWarp = 32;         // proxy columns per block of the column kernels
constexpr int kMaxRowWarps = 32;  // 32 x 32 = 1024 threads, the CUDA block limit
constexpr int kReduceThreads = 256;
constexpr int kRowChunk = 256;   // rows staged in shared memory at a time (RowTable)
constexpr int kRowPrefetch = 4;  // rows of `dots` each warp loads before it uses the first

// The column kernels' rows, staged in shared memory a chunk at a time: each row's values
// (pa_ism::make_row) and label are computed once per block instead of by every lane for
// every element, and the row loop's only global loads are its `dots`, kRowPrefetch rows
// at a time. Read in the loop, the row's norms, label and dots were four dependent loads
// per row (the disassembly shows each issued after the previous one's use).
template <typename acc_t>
struct RowTable {
  Row<acc_t> row[kRowChunk];
  int64_t label[kRowChunk];
};

// Rows per chunk: a multiple of the row warps, so each warp keeps the rows i = warp (mod
// warps) in increasing order, whatever B: the same summation order as one pass over B.
__device__ __forceinline__ int row_chunk(int warps) { return (kRowChunk / warps) * warps; }

// Stages the chunk of rows from r0 (row_chunk(warps) of them, fewer at the end of B) with
// all the block's threads, between two barriers; returns how many rows it staged.
template <typename acc_t>
__device__ int stage_rows(RowTable<acc_t>& table, const acc_t* __restrict__ row_stats,
                          const int64_t* __restrict__ labels, int64_t B, int64_t r0, int warps,
                          const Params<acc_t>& p) {
  const int chunk = row_chunk(warps);
  const int n = static_cast<int>(B - r0 < chunk ? B - r0 : chunk);
  const int threads = blockDim.x * blockDim.y;
  __syncthreads();  // the previous chunk is no longer read
  for (int j = threadIdx.y * blockDim.x + threadIdx.x; j < n; j += threads) {
    // All three loads before any use: make_row's square root and division would otherwise
    // hold back the next load.
    const acc_t mu_sq = row_stats[r0 + j], sigma_sq = row_stats[B + r0 + j];
    const int64_t label = labels[r0 + j];
    table.row[j] = pa_ism::make_row(mu_sq, sigma_sq, p);
    table.label[j] = label;
  }
  __syncthreads();
  return n;
}

// Calls body(row, label, i, dot) for this warp's rows i = warp (mod warps) in increasing
// order: row i's staged values and label (RowTable) and dot = dots[i][c] (0 for an invalid
// column). The rows are staged a chunk at a time, and the warp loads the dots of its next
// kRowPrefetch rows before it uses the first. The loop bounds are the same for the whole
// warp, so every lane calls body for every row and body may sum over the warp.
template <typename acc_t, typename Body>
__device__ __forceinline__ void for_each_row(RowTable<acc_t>& table, const acc_t* __restrict__ row_stats,
                                             const int64_t* __restrict__ labels, const acc_t* __restrict__ dots,
                                             int64_t B, int64_t C, int64_t c, bool valid, const Params<acc_t>& p,
                                             Body body) {
  const int warp = threadIdx.y, warps = blockDim.y;
  for (int64_t r0 = 0; r0 < B; r0 += row_chunk(warps)) {
    const int n = stage_rows(table, row_stats, labels, B, r0, warps, p);
    for (int j0 = warp; j0 < n; j0 += kRowPrefetch * warps) {
      acc_t dot[kRowPrefetch];
#pragma unroll
      for (int u = 0; u < kRowPrefetch; ++u) {
        const int j = j0 + u * warps;
        dot[u] = valid && j < n ? dots[(r0 + j) * C + c] : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kRowPrefetch; ++u) {
        const int j = j0 + u * warps;
        if (j >= n) break;
        body(table.row[j], table.label[j], r0 + j, dot[u]);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-d block (a multiple of 32 threads) in a fixed order; every thread gets it.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read from a previous call
  if (threadIdx.x % kWarp == 0) shared[threadIdx.x / kWarp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x) / kWarp; ++w) total += shared[w];
  return total;
}

// (Attributes rather than ATen's cached cudaDeviceProp: ATen/cuda/CUDAContext.h needs the
// cuSPARSE/cuBLAS headers, which a bare CUDA toolkit may lack.)
int device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

// The column kernels run one block per 32 proxy columns.
int64_t column_blocks(int64_t C) { return (C + kWarp - 1) / kWarp; }

// How many blocks of `kernel` one SM holds at once, by row warps per block (index 1..32),
// on the current device: its registers and shared memory decide, so CUDA is asked, once per
// kernel and device (each query costs host time, and the loss runs every step).
const std::vector<int>& resident_blocks(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, std::vector<int>> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto [entry, added] = cache.try_emplace({c10::cuda::current_device(), kernel});
  if (added) {
    const int most = std::min(kMaxRowWarps, device_attribute(cudaDevAttrMaxThreadsPerBlock) / kWarp);
    entry->second.assign(most + 1, 0);
    for (int warps = 1; warps <= most; ++warps) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&entry->second[warps], kernel, warps * kWarp, 0));
    }
  }
  return entry->second;  // never changed once added; map entries do not move
}

// Row warps per block of a column kernel: the most (up to the batch) with which every
// block is resident at once. The blocks' phases (proxy norms, rows, merge) are latency
// chains, so a second wave costs nearly a whole first one: filling every SM's threads instead
// (e.g. 24 warps, at most 2 blocks per SM at (120, 11318) on an H100) leaves a quarter of the
// blocks for a second wave. When even one warp per block cannot make one wave, the most
// resident warps per SM.
template <typename Kernel>
dim3 column_block(Kernel kernel, int64_t B, int64_t blocks) {
  const std::vector<int>& resident = resident_blocks(reinterpret_cast<const void*>(kernel));
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int most = static_cast<int>(std::min<int64_t>(int64_t(resident.size()) - 1, std::max<int64_t>(B, 1)));
  int best = most;
  for (int warps = most; warps >= 1; --warps) {
    if (resident[warps] * sms >= blocks) return dim3(kWarp, warps);
    if (resident[warps] * warps > resident[best] * best) best = warps;
  }
  return dim3(kWarp, best);
}

// row_stats = [|mu_i|^2; |sigma_i|^2], one block per row.
template <typename scalar_t, typename acc_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ sigma,
                                 const int64_t* __restrict__ labels, int64_t B, int64_t C, int64_t D, int64_t D_sigma,
                                 acc_t* __restrict__ row_stats) {
  __shared__ acc_t shared[kWarp];
  const int64_t i = blockIdx.x;
  acc_t mu_sq = 0, sigma_sq = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const acc_t x = static_cast<acc_t>(mu[i * D + k]);
    mu_sq += x * x;
  }
  for (int64_t k = threadIdx.x; k < D_sigma; k += blockDim.x) {
    const acc_t x = static_cast<acc_t>(sigma[i * D_sigma + k]);
    sigma_sq += x * x;
  }
  mu_sq = block_sum(mu_sq, shared);
  sigma_sq = block_sum(sigma_sq, shared);
  if (threadIdx.x == 0) {
    // The CPU kernel raises here; checking on the host would synchronise, and a label
    // outside [0, C) would otherwise count as a negative of every proxy.
    CUDA_KERNEL_ASSERT(labels[i] >= 0 && labels[i] < C);
    row_stats[i] = mu_sq;
    row_stats[B + i] = sigma_sq;
  }
}

// Writes col_stats (3 x C) and block_partials[block] = (sum of positive terms, number of
// columns with a positive, sum of negative terms) of the block's 32 columns.
template <typename scalar_t, typename acc_t, bool ISM>
__global__ void __launch_bounds__(1024)
    forward_kernel(const acc_t* __restrict__ dots, const acc_t* __restrict__ row_stats,
                   const int64_t* __restrict__ labels, const scalar_t* __restrict__ proxies, int64_t B, int64_t C,
                   int64_t D, Params<acc_t> p, acc_t* __restrict__ col_stats, acc_t* __restrict__ block_partials) {
  __shared__ acc_t s_p_sq[kWarp];
  __shared__ acc_t s_m[2][kMaxRowWarps][kWarp];
  __shared__ acc_t s_sum[2][kMaxRowWarps][kWarp];
  __shared__ bool s_has_pos[kMaxRowWarps][kWarp];
  __shared__ RowTable<acc_t> s_rows;
  const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
  const int64_t c0 = int64_t(blockIdx.x) * kWarp;

  // Squared norms of the block's proxies: one warp per proxy, lanes along D.
  for (int j = warp; j < kWarp; j += warps) {
    acc_t acc = 0;
    if (c0 + j < C) {
      for (int64_t k = lane; k < D; k += kWarp) {
        const acc_t x = static_cast<acc_t>(proxies[(c0 + j) * D + k]);
        acc += x * x;
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) s_p_sq[j] = acc;
  }
  __syncthreads();

  const int64_t c = c0 + lane;
  const bool valid = c < C;
  const Col<acc_t> col = pa_ism::make_col(s_p_sq[lane]);
  acc_t m_neg = 0, sum_neg = 0, m_pos = 0, sum_pos = 0;
  bool has_pos = false;
  for_each_row(s_rows, row_stats, labels, dots, B, C, c, valid, p,
               [&](const Row<acc_t>& row, int64_t label, int64_t, acc_t dot) {
                 if (!valid) return;
                 const acc_t sim = pa_ism::similarity<ISM>(dot, row, col);
                 if (label == c) {
                   has_pos = true;
                   pa_ism::lse_add(pa_ism::logit(sim, true, p), m_pos, sum_pos);
                 } else {
                   pa_ism::lse_add(pa_ism::logit(sim, false, p), m_neg, sum_neg);
                 }
               });
  s_m[0][warp][lane] = m_neg;
  s_sum[0][warp][lane] = sum_neg;
  s_m[1][warp][lane] = m_pos;
  s_sum[1][warp][lane] = sum_pos;
  s_has_pos[warp][lane] = has_pos;
  __syncthreads();
  if (warp != 0) return;

  for (int w = 1; w < warps; ++w) {
    pa_ism::lse_merge(s_m[0][w][lane], s_sum[0][w][lane], m_neg, sum_neg);
    pa_ism::lse_merge(s_m[1][w][lane], s_sum[1][w][lane], m_pos, sum_pos);
    has_pos = has_pos || s_has_pos[w][lane];
  }
  const acc_t lse_pos = valid && has_pos ? pa_ism::lse_finish(m_pos, sum_pos) : acc_t(0);
  const acc_t lse_neg = valid ? pa_ism::lse_finish(m_neg, sum_neg) : acc_t(0);
  if (valid) {
    col_stats[c] = col.sq;
    col_stats[C + c] = lse_pos;
    col_stats[2 * C + c] = lse_neg;
  }
  const acc_t pos_total = warp_sum(lse_pos);
  const acc_t num_pos = warp_sum(valid && has_pos ? acc_t(1) : acc_t(0));
  const acc_t neg_total = warp_sum(lse_neg);
  if (lane == 0) {
    block_partials[3 * blockIdx.x] = pos_total;
    block_partials[3 * blockIdx.x + 1] = num_pos;
    block_partials[3 * blockIdx.x + 2] = neg_total;
  }
}

// loss = sum(positive terms) / max(|P+|, 1) + sum(negative terms) / C; one block.
template <typename acc_t>
__global__ void forward_finish_kernel(const acc_t* __restrict__ block_partials, int64_t num_blocks, int64_t C,
                                      acc_t* __restrict__ loss, acc_t* __restrict__ num_positive) {
  __shared__ acc_t shared[kWarp];
  acc_t pos = 0, count = 0, neg = 0;
  for (int64_t b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    pos += block_partials[3 * b];
    count += block_partials[3 * b + 1];
    neg += block_partials[3 * b + 2];
  }
  pos = block_sum(pos, shared);
  count = block_sum(count, shared);
  neg = block_sum(neg, shared);
  if (threadIdx.x == 0) {
    *num_positive = count;
    *loss = pos / (count > acc_t(1) ? count : acc_t(1)) + neg / acc_t(C);
  }
}

// Writes coeff = coeff_scale * dL/d(dots) (B x C, input dtype), row_partials[block] =
// (per-row sums of the |mu|^2 and |sigma|^2 terms over the block's columns, 2 x B) and
// grad_proxies rows of the block's columns = 2 (sum_i |p|^2 terms) p_c.
template <typename scalar_t, typename acc_t, bool ISM>
__global__ void __launch_bounds__(1024)
    backward_kernel(const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ dots,
                    const acc_t* __restrict__ row_stats, const acc_t* __restrict__ col_stats,
                    const acc_t* __restrict__ num_positive, const int64_t* __restrict__ labels,
                    const scalar_t* __restrict__ proxies, int64_t B, int64_t C, int64_t D, Params<acc_t> p,
                    acc_t coeff_scale, scalar_t* __restrict__ coeff, acc_t* __restrict__ row_partials,
                    scalar_t* __restrict__ grad_proxies) {
  __shared__ acc_t s_col[kMaxRowWarps][kWarp];
  __shared__ acc_t s_scale[kWarp];
  __shared__ RowTable<acc_t> s_rows;
  const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
  const int64_t c0 = int64_t(blockIdx.x) * kWarp;
  const int64_t c = c0 + lane;
  const bool valid = c < C;
  const acc_t g = *grad_loss, count = *num_positive;
  const acc_t pos_weight = g / (count > acc_t(1) ? count : acc_t(1));
  const acc_t neg_weight = g / acc_t(C);
  const Col<acc_t> col = pa_ism::make_col(valid ? col_stats[c] : acc_t(1));
  const acc_t lse_pos = valid ? col_stats[C + c] : acc_t(0);
  const acc_t lse_neg = valid ? col_stats[2 * C + c] : acc_t(0);
  acc_t col_term = 0;
  for_each_row(s_rows, row_stats, labels, dots, B, C, c, valid, p,
               [&](const Row<acc_t>& row, int64_t label, int64_t i, acc_t dot) {
                 pa_ism::Grad<acc_t> e{0, 0, 0, 0};  // invalid lanes add zeros to the row sums
                 if (valid) {
                   const bool positive = label == c;
                   e = pa_ism::element_grad<ISM>(dot, row, col, positive, positive ? lse_pos : lse_neg,
                                                 positive ? pos_weight : neg_weight, p);
                   coeff[i * C + c] = static_cast<scalar_t>(e.dots * coeff_scale);
                   col_term += e.p_sq;
                 }
                 const acc_t mu_term = warp_sum(e.mu_sq);
                 const acc_t u_term = warp_sum(e.u);
                 if (lane == 0) {
                   row_partials[(2 * int64_t(blockIdx.x)) * B + i] = mu_term;
                   row_partials[(2 * int64_t(blockIdx.x) + 1) * B + i] = u_term;
                 }
               });
  s_col[warp][lane] = col_term;
  __syncthreads();
  if (warp == 0) {
    acc_t total = 0;
    for (int w = 0; w < warps; ++w) total += s_col[w][lane];
    s_scale[lane] = acc_t(2) * total;
  }
  __syncthreads();
  // One warp per proxy of the block, lanes along D (coalesced).
  for (int j = warp; j < kWarp && c0 + j < C; j += warps) {
    for (int64_t k = lane; k < D; k += kWarp) {
      const int64_t at = (c0 + j) * D + k;
      grad_proxies[at] = static_cast<scalar_t>(s_scale[j] * static_cast<acc_t>(proxies[at]));
    }
  }
}

// grad_mu = 2 (sum over blocks of the |mu|^2 terms) mu_i (the GEMM is added later) and
// grad_sigma = 2 (sum of the |sigma|^2 terms) sigma_i; one block per row.
template <typename scalar_t, typename acc_t>
__global__ void backward_rows_kernel(const acc_t* __restrict__ row_partials, int64_t num_blocks,
                                     const scalar_t* __restrict__ mu, const scalar_t* __restrict__ sigma, int64_t B,
                                     int64_t D, int64_t D_sigma, bool ism, scalar_t* __restrict__ grad_mu,
                                     scalar_t* __restrict__ grad_sigma) {
  __shared__ acc_t shared[kWarp];
  const int64_t i = blockIdx.x;
  acc_t mu_term = 0, u_term = 0;
  for (int64_t b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    mu_term += row_partials[2 * b * B + i];
    u_term += row_partials[(2 * b + 1) * B + i];
  }
  mu_term = acc_t(2) * block_sum(mu_term, shared);
  u_term = acc_t(2) * block_sum(u_term, shared);
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    grad_mu[i * D + k] = static_cast<scalar_t>(mu_term * static_cast<acc_t>(mu[i * D + k]));
  }
  for (int64_t k = threadIdx.x; k < D_sigma; k += blockDim.x) {
    grad_sigma[i * D_sigma + k] =
        ism ? static_cast<scalar_t>(u_term * static_cast<acc_t>(sigma[i * D_sigma + k])) : scalar_t(0);
  }
}

template <typename T>
Params<T> make_params(double margin, double alpha, double ism_offset, double ism_scale) {
  return {T(margin), T(alpha), T(ism_offset), T(ism_scale)};
}

// float16 coefficients would fall below its normal range (they carry 1/C); they are scaled
// by a power of two, keeping alpha * scale <= 2^11 so the largest (about alpha / (|P+|
// |mu| |p|)) stays far from 65504, and the GEMMs divide it out again. They are computed for
// grad_loss = 1 and the gradients multiplied by grad_loss at the end: a loss scale such as
// GradScaler's 2^16 would otherwise overflow them.
double coeff_scale_for(at::ScalarType dtype, double alpha) {
  if (dtype != at::kHalf || !(alpha > 0)) return 1.0;
  return std::max(1.0, std::exp2(std::floor(std::log2(2048.0 / alpha))));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pa_ism_forward_cuda(
    const at::Tensor& mu_in, const at::Tensor& sigma_in, const at::Tensor& labels_in, const at::Tensor& proxies_in,
    double margin, double alpha, bool ism, double ism_offset, double ism_scale) {
  // Checked before the guard: a CPU tensor among CUDA ones gets the inputs' own message.
  const pa_ism::Inputs in = pa_ism::checked_inputs(mu_in, sigma_in, labels_in, proxies_in, margin, alpha, ism_offset,
                                                   ism_scale, /*reduced_precision=*/true);
  const c10::cuda::CUDAGuard device_guard(in.mu.device());
  const at::Tensor &mu = in.mu, &sigma = in.sigma, &labels = in.labels, &proxies = in.proxies;
  const int64_t B = mu.size(0), C = proxies.size(0), D = mu.size(1), D_sigma = sigma.size(1);
  const at::ScalarType acc_type = at::toOpMathType(mu.scalar_type());
  const at::TensorOptions acc = mu.options().dtype(acc_type);
  // Half inputs: cuBLAS accumulates in float32 and, with out_dtype, also returns float32.
  const at::Tensor dots = acc_type == mu.scalar_type() ? at::mm(mu, proxies.t()) : at::mm(mu, proxies.t(), acc_type);
  const at::Tensor row_stats = at::empty({2, B}, acc);
  const at::Tensor col_stats = at::empty({3, C}, acc);
  const at::Tensor loss = at::empty({}, acc);
  const at::Tensor num_positive = at::empty({}, acc);
  const int64_t blocks = column_blocks(C);
  const at::Tensor block_partials = at::empty({blocks, 3}, acc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "pa_ism_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> p = make_params<acc_t>(margin, alpha, ism_offset, ism_scale);
    if (B > 0) {
      row_norms_kernel<scalar_t, acc_t><<<B, kReduceThreads, 0, stream>>>(
          mu.const_data_ptr<scalar_t>(), sigma.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), B, C, D,
          D_sigma, row_stats.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    auto kernel = ism ? forward_kernel<scalar_t, acc_t, true> : forward_kernel<scalar_t, acc_t, false>;
    kernel<<<static_cast<unsigned>(blocks), column_block(kernel, B, blocks), 0, stream>>>(
        dots.const_data_ptr<acc_t>(), row_stats.const_data_ptr<acc_t>(), labels.const_data_ptr<int64_t>(),
        proxies.const_data_ptr<scalar_t>(), B, C, D, p, col_stats.mutable_data_ptr<acc_t>(),
        block_partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    forward_finish_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(block_partials.const_data_ptr<acc_t>(), blocks, C,
                                                                   loss.mutable_data_ptr<acc_t>(),
                                                                   num_positive.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, dots, row_stats, col_stats, num_positive};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_ism_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& mu_in, const at::Tensor& sigma_in, const at::Tensor& labels_in,
    const at::Tensor& proxies_in, const at::Tensor& dots_in, const at::Tensor& row_stats_in,
    const at::Tensor& col_stats_in, const at::Tensor& num_positive_in, double margin, double alpha, bool ism,
    double ism_offset, double ism_scale) {
  // Checked before the guard, as in the forward.
  const pa_ism::BackwardInputs checked = pa_ism::checked_backward_inputs(
      grad_loss, mu_in, sigma_in, labels_in, proxies_in, dots_in, row_stats_in, col_stats_in, num_positive_in, margin,
      alpha, ism_offset, ism_scale, /*reduced_precision=*/true);
  const c10::cuda::CUDAGuard device_guard(checked.in.mu.device());
  const at::Tensor &mu = checked.in.mu, &sigma = checked.in.sigma, &labels = checked.in.labels;
  const at::Tensor &proxies = checked.in.proxies, &dots = checked.dots, &row_stats = checked.row_stats;
  const at::Tensor &col_stats = checked.col_stats, &num_positive = checked.num_positive;
  const at::ScalarType acc_type = at::toOpMathType(mu.scalar_type());
  const at::Tensor grad = grad_loss.to(mu.device(), acc_type).contiguous();  // a CPU scalar is fine
  const bool unit_grad = mu.scalar_type() == at::kHalf;                      // see coeff_scale_for
  const at::Tensor kernel_grad = unit_grad ? at::ones({}, grad.options()) : grad;
  const int64_t B = mu.size(0), C = proxies.size(0), D = mu.size(1), D_sigma = sigma.size(1);
  const int64_t blocks = column_blocks(C);
  const at::Tensor coeff = at::empty({B, C}, mu.options());
  const at::Tensor row_partials = at::empty({blocks, 2, B}, mu.options().dtype(acc_type));
  at::Tensor grad_mu = at::empty_like(mu), grad_sigma = at::empty_like(sigma);
  at::Tensor grad_proxies = at::empty_like(proxies);
  const double coeff_scale = coeff_scale_for(mu.scalar_type(), alpha);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "pa_ism_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> p = make_params<acc_t>(margin, alpha, ism_offset, ism_scale);
    auto kernel = ism ? backward_kernel<scalar_t, acc_t, true> : backward_kernel<scalar_t, acc_t, false>;
    kernel<<<static_cast<unsigned>(blocks), column_block(kernel, B, blocks), 0, stream>>>(
        kernel_grad.const_data_ptr<acc_t>(), dots.const_data_ptr<acc_t>(), row_stats.const_data_ptr<acc_t>(),
        col_stats.const_data_ptr<acc_t>(), num_positive.const_data_ptr<acc_t>(), labels.const_data_ptr<int64_t>(),
        proxies.const_data_ptr<scalar_t>(), B, C, D, p, acc_t(coeff_scale), coeff.mutable_data_ptr<scalar_t>(),
        row_partials.mutable_data_ptr<acc_t>(), grad_proxies.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (B > 0) {
      backward_rows_kernel<scalar_t, acc_t><<<B, kReduceThreads, 0, stream>>>(
          row_partials.const_data_ptr<acc_t>(), blocks, mu.const_data_ptr<scalar_t>(), sigma.const_data_ptr<scalar_t>(),
          B, D, D_sigma, ism, grad_mu.mutable_data_ptr<scalar_t>(), grad_sigma.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  grad_mu.addmm_(coeff, proxies, 1.0, 1.0 / coeff_scale);
  grad_proxies.addmm_(coeff.t(), mu, 1.0, 1.0 / coeff_scale);
  if (unit_grad) {
    // In float32: a float16 tensor times a CUDA scalar casts the scalar to float16 first,
    // and GradScaler's 2^16 is beyond float16's largest value (inf, and NaN where 0 * inf).
    for (at::Tensor* g : {&grad_mu, &grad_sigma, &grad_proxies}) g->copy_(g->to(acc_type).mul_(grad));
  }
  return {grad_mu, grad_sigma, grad_proxies};
}

}  // namespace

TORCH_LIBRARY_IMPL(idml, CUDA, m) {
  m.impl("pa_ism_forward", &pa_ism_forward_cuda);
  m.impl("pa_ism_backward", &pa_ism_backward_cuda);
}

}  // namespace idml
