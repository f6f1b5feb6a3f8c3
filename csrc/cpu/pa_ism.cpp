// CPU kernels of the introspective Proxy Anchor loss (float32, float64).
//
// Forward: dots = mu P^T (MKL through at::mm), then one pass over tiles of kTile proxy
// columns (at::parallel_for over tiles): squared proxy norms, sI and the logits of every
// element, and each column's positive and negative log-sum-exp.
// Backward: one pass over the same tiles writes the B x C coefficient matrix dL/d(dots),
// the per-column and per-row norm terms, and grad_P's norm term; two addmm_ finish
// grad_mu and grad_P. The element math is csrc/pa_ism.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../pa_ism.h"

namespace idml {
namespace {

using pa_ism::Col;
using pa_ism::Params;
using pa_ism::Row;

// Columns per tile: the inner loops run over them (vectorised); the forward keeps a
// B x kTile buffer of logits per tile, which stays in the L2 cache.
constexpr int64_t kTile = 64;

// The hot loops are compiled for several instruction sets and picked at load time, since
// the extension's flags only promise the x86-64 baseline (SSE2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IDML_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IDML_MULTIVERSION
#endif

template <typename T>
IDML_MULTIVERSION T sum_of_squares(const T* x, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += x[k] * x[k];
  return acc;
}

template <typename T>
IDML_MULTIVERSION void scale_rows(const T* x, const T* factor, T* out, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const T f = factor[r];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[r * n + k] = f * x[r * n + k];
  }
}

// Per tile: columns' squared norms and both log-sum-exps; returns into `partial` the tile's
// (sum of positive terms, number of columns with a positive, sum of negative terms).
template <typename T, bool ISM>
IDML_MULTIVERSION void forward_tile(const T* dots, const T* row_stats, const int64_t* labels, const T* proxies,
                                    int64_t B, int64_t C, int64_t D, const Params<T>& p, int64_t c0, int64_t c1, T* z,
                                    T* col_stats, T* partial) {
  const int64_t n = c1 - c0;
  T p_sq[kTile], inv_p[kTile], m[kTile], sum[kTile], m_pos[kTile], sum_pos[kTile];
  bool has_pos[kTile];
  for (int64_t j = 0; j < n; ++j) {
    p_sq[j] = sum_of_squares(proxies + (c0 + j) * D, D);
    inv_p[j] = pa_ism::make_col(p_sq[j]).inv_norm;
    m[j] = sum[j] = m_pos[j] = sum_pos[j] = T(0);
    has_pos[j] = false;
  }
  for (int64_t i = 0; i < B; ++i) {
    const Row<T> row = pa_ism::make_row(row_stats[i], row_stats[B + i], p);
    const T* dots_i = dots + i * C + c0;
    T* z_i = z + i * kTile;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T sim = pa_ism::similarity<ISM>(dots_i[j], row, Col<T>{p_sq[j], inv_p[j]});
      z_i[j] = pa_ism::logit(sim, false, p);
    }
    // Row i has exactly one positive column, its label: move it to the positive sum.
    const int64_t j = labels[i] - c0;
    if (j >= 0 && j < n) {
      const T sim = pa_ism::similarity<ISM>(dots_i[j], row, Col<T>{p_sq[j], inv_p[j]});
      pa_ism::lse_add(pa_ism::logit(sim, true, p), m_pos[j], sum_pos[j]);
      has_pos[j] = true;
      z_i[j] = -std::numeric_limits<T>::infinity();
    }
  }
  for (int64_t i = 0; i < B; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) m[j] = std::max(m[j], z[i * kTile + j]);
  }
  for (int64_t i = 0; i < B; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sum[j] += pa_ism::exp_(z[i * kTile + j] - m[j]);
  }
  T pos_total = 0, num_pos = 0, neg_total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T lse_pos = has_pos[j] ? pa_ism::lse_finish(m_pos[j], sum_pos[j]) : T(0);
    const T lse_neg = pa_ism::lse_finish(m[j], sum[j]);
    col_stats[c0 + j] = p_sq[j];
    col_stats[C + c0 + j] = lse_pos;
    col_stats[2 * C + c0 + j] = lse_neg;
    pos_total += lse_pos;
    num_pos += has_pos[j] ? T(1) : T(0);
    neg_total += lse_neg;
  }
  partial[0] = pos_total;
  partial[1] = num_pos;
  partial[2] = neg_total;
}

// Per tile: the coefficient matrix columns, each row's (mu_sq, u) terms summed over the
// tile into `row_partial` (2 x B), and grad_P's norm term 2 (sum_i p_sq term) p_c.
template <typename T, bool ISM>
IDML_MULTIVERSION void backward_tile(const T* dots, const T* row_stats, const T* col_stats, const int64_t* labels,
                                     const T* proxies, int64_t B, int64_t C, int64_t D, const Params<T>& p,
                                     T pos_weight, T neg_weight, int64_t c0, int64_t c1, T* coeff, T* row_partial,
                                     T* grad_proxies) {
  const int64_t n = c1 - c0;
  const T* p_sq = col_stats + c0;
  const T* lse_pos = col_stats + C + c0;
  const T* lse_neg = col_stats + 2 * C + c0;
  T inv_p[kTile], col_term[kTile];
  for (int64_t j = 0; j < n; ++j) {
    inv_p[j] = pa_ism::make_col(p_sq[j]).inv_norm;
    col_term[j] = T(0);
  }
  for (int64_t i = 0; i < B; ++i) {
    const Row<T> row = pa_ism::make_row(row_stats[i], row_stats[B + i], p);
    const int64_t label = labels[i] - c0;
    const T* dots_i = dots + i * C + c0;
    T* coeff_i = coeff + i * C + c0;
    T mu_term = 0, u_term = 0;
#pragma omp simd reduction(+ : mu_term, u_term)
    for (int64_t j = 0; j < n; ++j) {
      const bool positive = j == label;
      const pa_ism::Grad<T> g =
          pa_ism::element_grad<ISM>(dots_i[j], row, Col<T>{p_sq[j], inv_p[j]}, positive,
                                    positive ? lse_pos[j] : lse_neg[j], positive ? pos_weight : neg_weight, p);
      coeff_i[j] = g.dots;
      col_term[j] += g.p_sq;
      mu_term += g.mu_sq;
      u_term += g.u;
    }
    row_partial[i] = mu_term;
    row_partial[B + i] = u_term;
  }
  for (int64_t j = 0; j < n; ++j) col_term[j] *= T(2);
  scale_rows(proxies + c0 * D, col_term, grad_proxies + c0 * D, n, D);
}

// A label outside [0, C) would make a row without a positive proxy (a silently wrong loss).
void check_label_range(const at::Tensor& labels, int64_t C) {
  const int64_t* label = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK(label[i] >= 0 && label[i] < C, "pa_ism: label ", label[i], " is outside [0, ", C, ")");
  }
}

template <typename T>
Params<T> make_params(double margin, double alpha, double ism_offset, double ism_scale) {
  return {T(margin), T(alpha), T(ism_offset), T(ism_scale)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pa_ism_forward_cpu(
    const at::Tensor& mu_in, const at::Tensor& sigma_in, const at::Tensor& labels_in, const at::Tensor& proxies_in,
    double margin, double alpha, bool ism, double ism_offset, double ism_scale) {
  const pa_ism::Inputs in = pa_ism::checked_inputs(mu_in, sigma_in, labels_in, proxies_in, margin, alpha, ism_offset,
                                                   ism_scale, /*reduced_precision=*/false);
  const at::Tensor &mu = in.mu, &sigma = in.sigma, &labels = in.labels, &proxies = in.proxies;
  const int64_t B = mu.size(0), C = proxies.size(0), D = mu.size(1);
  check_label_range(labels, C);
  const at::Tensor dots = at::mm(mu, proxies.t());
  const at::Tensor row_stats = at::empty({2, B}, mu.options());
  const at::Tensor col_stats = at::empty({3, C}, mu.options());
  const int64_t num_tiles = (C + kTile - 1) / kTile;
  const at::Tensor partials = at::empty({num_tiles, 3}, mu.options());
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "pa_ism_forward_cpu", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(margin, alpha, ism_offset, ism_scale);
    scalar_t* rows = row_stats.mutable_data_ptr<scalar_t>();
    // Serial below ATen's grain (B x D is small next to the B x C work).
    at::parallel_for(
        0, B, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            rows[i] = sum_of_squares(mu.const_data_ptr<scalar_t>() + i * D, D);
            rows[B + i] = sum_of_squares(sigma.const_data_ptr<scalar_t>() + i * sigma.size(1), sigma.size(1));
          }
        });
    at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> z(B * kTile);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kTile, c1 = std::min(C, c0 + kTile);
        auto tile = ism ? forward_tile<scalar_t, true> : forward_tile<scalar_t, false>;
        tile(dots.const_data_ptr<scalar_t>(), rows, label_ptr, proxies.const_data_ptr<scalar_t>(), B, C, D, p, c0, c1,
             z.data(), col_stats.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<scalar_t>() + 3 * t);
      }
    });
  });
  // Per-tile partials summed after the parallel loop: the result does not depend on how
  // the tiles were shared among threads.
  const at::Tensor totals = partials.sum(0);
  const at::Tensor num_positive = totals[1];
  const at::Tensor loss = totals[0] / num_positive.clamp_min(1) + totals[2] / C;
  return {loss, dots, row_stats, col_stats, num_positive.clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_ism_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& mu_in, const at::Tensor& sigma_in, const at::Tensor& labels_in,
    const at::Tensor& proxies_in, const at::Tensor& dots_in, const at::Tensor& row_stats_in,
    const at::Tensor& col_stats_in, const at::Tensor& num_positive_in, double margin, double alpha, bool ism,
    double ism_offset, double ism_scale) {
  const pa_ism::BackwardInputs checked = pa_ism::checked_backward_inputs(
      grad_loss, mu_in, sigma_in, labels_in, proxies_in, dots_in, row_stats_in, col_stats_in, num_positive_in, margin,
      alpha, ism_offset, ism_scale, /*reduced_precision=*/false);
  const at::Tensor &mu = checked.in.mu, &sigma = checked.in.sigma, &labels = checked.in.labels;
  const at::Tensor &proxies = checked.in.proxies, &dots = checked.dots, &row_stats = checked.row_stats;
  const at::Tensor &col_stats = checked.col_stats, &num_positive = checked.num_positive;
  const int64_t B = mu.size(0), C = proxies.size(0), D = mu.size(1);
  check_label_range(labels, C);
  const int64_t num_tiles = (C + kTile - 1) / kTile;
  const at::Tensor coeff = at::empty({B, C}, mu.options());
  const at::Tensor row_partials = at::empty({num_tiles, 2, B}, mu.options());
  at::Tensor grad_proxies = at::empty_like(proxies);
  at::Tensor grad_mu, grad_sigma;
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "pa_ism_backward_cpu", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(margin, alpha, ism_offset, ism_scale);
    const scalar_t g = grad_loss.item<scalar_t>();
    const scalar_t pos_weight = g / std::max(num_positive.item<scalar_t>(), scalar_t(1));
    const scalar_t neg_weight = g / scalar_t(C);
    at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kTile, c1 = std::min(C, c0 + kTile);
        auto tile = ism ? backward_tile<scalar_t, true> : backward_tile<scalar_t, false>;
        tile(dots.const_data_ptr<scalar_t>(), row_stats.const_data_ptr<scalar_t>(),
             col_stats.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), proxies.const_data_ptr<scalar_t>(),
             B, C, D, p, pos_weight, neg_weight, c0, c1, coeff.mutable_data_ptr<scalar_t>(),
             row_partials.mutable_data_ptr<scalar_t>() + t * 2 * B, grad_proxies.mutable_data_ptr<scalar_t>());
      }
    });
  });
  // Row terms summed over tiles in a fixed order; then d|x|^2/dx = 2x.
  const at::Tensor row_terms = row_partials.sum(0).mul_(2);
  grad_mu = mu * row_terms[0].unsqueeze(1);
  grad_mu.addmm_(coeff, proxies);
  grad_proxies.addmm_(coeff.t(), mu);
  grad_sigma = ism ? sigma * row_terms[1].unsqueeze(1) : at::zeros_like(sigma);
  return {grad_mu, grad_sigma, grad_proxies};
}

}  // namespace

TORCH_LIBRARY_IMPL(idml, CPU, m) {
  m.impl("pa_ism_forward", &pa_ism_forward_cpu);
  m.impl("pa_ism_backward", &pa_ism_backward_cpu);
}

}  // namespace idml
