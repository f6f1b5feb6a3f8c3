// Scalar math of the introspective Proxy Anchor loss (docs/method.md, sections 2-3),
// shared by the CPU kernel (cpu/pa_ism.cpp) and the CUDA kernel (cuda/pa_ism.cu) so both
// evaluate exactly the same formulas. Everything here works on ONE element (i, c) of the
// B x C similarity matrix, from the product mu_i . p_c and the squared row/column norms.
// checked_inputs and checked_backward_inputs at the end validate the operators' arguments
// for both backends.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__CUDACC__)
#define IDML_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced, so the hot loops of the CPU kernel vectorise with these calls inlined.
#define IDML_HD inline __attribute__((always_inline))
#else
#define IDML_HD inline
#endif

namespace idml {
namespace pa_ism {

// The same constants as idml/reference.py (NORM_EPS, DISTANCE_EPS).
constexpr double kNormEps = 1e-12;
constexpr double kDistanceEps = 1e-8;

// exp for the hot loops. On the host, float uses a branch-free Cephes-style polynomial
// (about 1 ulp) that the compiler vectorises: std::exp stays a scalar libm call without
// -ffast-math. Returns exactly 0 below the smallest normal result, so exp(-inf) == 0.
IDML_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  constexpr float kLow = -87.33654f;  // log(FLT_MIN)
  constexpr float kHigh = 88.0f;      // keeps the exponent below 255
  const float xc = x < kLow ? kLow : (x > kHigh ? kHigh : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: the integer lands in the low mantissa bits.
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, two-part ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n as a float
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < kLow ? 0.0f : (x > kHigh ? INFINITY : y);
#endif
}

IDML_HD double exp_(double x) { return ::exp(x); }
IDML_HD float sqrt_(float x) { return ::sqrtf(x); }
IDML_HD double sqrt_(double x) { return ::sqrt(x); }
IDML_HD float log_(float x) { return ::logf(x); }
IDML_HD double log_(double x) { return ::log(x); }

template <typename T>
struct Params {
  T margin;  // delta
  T alpha;
  T offset;  // a in exp(-(u + a) / (b d))
  T scale;   // b
};

// What element (i, c) needs from row i: |mu_i|^2, 1 / |mu_i| and k_i = (|sigma_i|^2 + a) / b.
template <typename T>
struct Row {
  T sq;
  T inv_norm;
  T k;
};

template <typename T>
IDML_HD Row<T> make_row(T mu_sq, T sigma_sq, const Params<T>& p) {
  return {mu_sq, T(1) / sqrt_(mu_sq + T(kNormEps)), (sigma_sq + p.offset) / p.scale};
}

// What element (i, c) needs from proxy c: |p_c|^2 and 1 / |p_c|.
template <typename T>
struct Col {
  T sq;
  T inv_norm;
};

template <typename T>
IDML_HD Col<T> make_col(T proxy_sq) {
  return {proxy_sq, T(1) / sqrt_(proxy_sq + T(kNormEps))};
}

// sI_ic = 1 - (1 - s) exp(-k_i / d_ic) with the distance clamped below at kDistanceEps
// (so d -> 0 gives sI -> 1); with ISM false the plain cosine s.
template <bool ISM, typename T>
IDML_HD T similarity(T dot, const Row<T>& row, const Col<T>& col) {
  const T s = dot * row.inv_norm * col.inv_norm;
  if (!ISM) return s;
  T d = row.sq + col.sq - T(2) * dot;
  d = d < T(kDistanceEps) ? T(kDistanceEps) : d;
  return T(1) - (T(1) - s) * exp_(-row.k / d);
}

// Logit of the element in its column's log-sum-exp: -alpha (sI - delta) for a positive
// pair, alpha (sI + delta) for a negative one.
template <typename T>
IDML_HD T logit(T sim, bool positive, const Params<T>& p) {
  return positive ? -p.alpha * (sim - p.margin) : p.alpha * (sim + p.margin);
}

// Online update of a column's log(1 + sum exp z), kept as (m, sum) with m = max(0, max z)
// and sum = sum exp(z - m) (the "1" is added at the end, as exp(-m)).
template <typename T>
IDML_HD void lse_add(T z, T& m, T& sum) {
  if (z > m) {
    sum = sum * exp_(m - z) + T(1);
    m = z;
  } else {
    sum += exp_(z - m);
  }
}

template <typename T>
IDML_HD void lse_merge(T m2, T sum2, T& m, T& sum) {
  if (m2 > m) {
    sum = sum * exp_(m - m2) + sum2;
    m = m2;
  } else {
    sum += sum2 * exp_(m2 - m);
  }
}

template <typename T>
IDML_HD T lse_finish(T m, T sum) {
  return m + log_(exp_(-m) + sum);
}

// Derivatives of L with respect to the four quantities element (i, c) is made of:
//   dots:  dL/d(mu_i . p_c)            (the B x C coefficient matrix of the backward GEMMs)
//   mu_sq: dL/d|mu_i|^2  contribution  (summed over c: grad_mu += 2 sum * mu_i)
//   p_sq:  dL/d|p_c|^2   contribution  (summed over i: grad_p  += 2 sum * p_c)
//   u:     dL/d|sigma_i|^2 contribution (summed over c: grad_sigma = 2 sum * sigma_i)
template <typename T>
struct Grad {
  T dots;
  T mu_sq;
  T p_sq;
  T u;
};

// `lse` is the column's log-sum-exp for the element's kind (positive or negative) and
// `weight` is dL/d(lse) for it: grad_loss / |P+| (positive) or grad_loss / C (negative).
template <bool ISM, typename T>
IDML_HD Grad<T> element_grad(T dot, const Row<T>& row, const Col<T>& col, bool positive, T lse, T weight,
                             const Params<T>& p) {
  const T s = dot * row.inv_norm * col.inv_norm;
  T sim = s;
  T e = T(1);                          // exp(-k / d)
  T d_raw = T(0), d = T(1), t = T(0);  // distance, clamped distance, k / d
  if (ISM) {
    d_raw = row.sq + col.sq - T(2) * dot;
    d = d_raw < T(kDistanceEps) ? T(kDistanceEps) : d_raw;
    t = row.k / d;
    e = exp_(-t);
    sim = T(1) - (T(1) - s) * e;
  }
  const T z = logit(sim, positive, p);
  // dL/dsI = dL/dlse * exp(z - lse) * dz/dsI.
  const T g = weight * exp_(z - lse) * (positive ? -p.alpha : p.alpha);
  const T g_s = g * e;  // dL/ds
  T g_d = T(0), g_u = T(0);
  if (ISM) {
    const T g_e = g * (T(1) - s) * e;
    // dsI/dd = -(1 - s) E k / d^2 (zero where the clamp is active); dsI/du = (1 - s) E / (b d).
    g_d = d_raw >= T(kDistanceEps) ? -(g_e * t) / d : T(0);
    g_u = g_e / (p.scale * d);
  }
  const T inv_mu_sq = row.inv_norm * row.inv_norm;
  const T inv_p_sq = col.inv_norm * col.inv_norm;
  // s = dot / (|mu| |p|) and d = |mu|^2 + |p|^2 - 2 dot.
  return {g_s * row.inv_norm * col.inv_norm - T(2) * g_d, T(-0.5) * g_s * s * inv_mu_sq + g_d,
          T(-0.5) * g_s * s * inv_p_sq + g_d, g_u};
}

// --- argument checks, shared by the CPU and CUDA kernels ---------------------------------
// Every tensor's rank, shape, dtype, device and layout and every hyperparameter's range
// are checked before a kernel reads anything: bad input raises a c10::Error (RuntimeError
// in Python) naming the argument, never an out-of-bounds read or an uninitialised result.
// Metadata only, so no host synchronisation; the labels' range is the kernels' (data).

// The operators' tensor arguments, validated and made contiguous.
struct Inputs {
  at::Tensor mu, sigma, labels, proxies;
};

// The backward's further arguments (the forward's outputs), validated and made contiguous.
struct BackwardInputs {
  Inputs in;
  at::Tensor grad_loss, dots, row_stats, col_stats, num_positive;
};

// A dense tensor on `device` (the device of mu).
inline void check_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), "pa_ism: ", name, " is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, "pa_ism: ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.device() == device, "pa_ism: all inputs must be on the same device, but ", name, " is on ", t.device(),
              " and mu on ", device);
}

// A tensor of exactly `sizes` and dtype `dtype` (the forward's outputs, fed to the backward).
inline void check_saved(const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype,
                        const at::Device& device) {
  check_tensor(t, name, device);
  TORCH_CHECK(t.sizes() == sizes, "pa_ism_backward: ", name, " must have shape ", sizes,
              " (as pa_ism_forward returns it for these inputs), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "pa_ism_backward: ", name, " must be ", dtype,
              " (as pa_ism_forward returns it for these inputs), got ", t.scalar_type());
}

// reduced_precision: whether the backend's kernels take float16 and bfloat16 (CUDA's do).
inline Inputs checked_inputs(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& labels,
                             const at::Tensor& proxies, double margin, double alpha, double ism_offset,
                             double ism_scale, bool reduced_precision) {
  TORCH_CHECK(mu.defined(), "pa_ism: mu is an undefined tensor");
  const at::Device device = mu.device();
  check_tensor(mu, "mu", device);
  check_tensor(sigma, "sigma", device);
  check_tensor(labels, "labels", device);
  check_tensor(proxies, "proxies", device);
  TORCH_CHECK(mu.dim() == 2 && sigma.dim() == 2 && proxies.dim() == 2,
              "pa_ism: mu (B, D), sigma (B, D') and proxies (C, D) must be matrices, got ", mu.dim(), "-D, ",
              sigma.dim(), "-D and ", proxies.dim(), "-D");
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong, "pa_ism: labels must be a 1-d int64 tensor, got ",
              labels.dim(), "-D ", labels.scalar_type());
  TORCH_CHECK(sigma.size(0) == mu.size(0) && labels.size(0) == mu.size(0),
              "pa_ism: mu, sigma and labels must have the same number of rows, got ", mu.size(0), ", ", sigma.size(0),
              " and ", labels.size(0));
  // An empty batch has no loss (the reference's maxima over it are undefined).
  TORCH_CHECK(mu.size(0) > 0, "pa_ism: mu must hold at least one sample, got shape ", mu.sizes());
  TORCH_CHECK(mu.size(1) > 0, "pa_ism: mu must have at least one column, got shape ", mu.sizes(),
              " (embeddings of width 0 have no direction)");
  TORCH_CHECK(proxies.size(1) == mu.size(1), "pa_ism: proxies and mu must have the same width, got ", proxies.size(1),
              " and ", mu.size(1));
  TORCH_CHECK(proxies.size(0) > 0, "pa_ism: at least one proxy is needed");
  const at::ScalarType dtype = mu.scalar_type();
  TORCH_CHECK(sigma.scalar_type() == dtype && proxies.scalar_type() == dtype,
              "pa_ism: mu, sigma and proxies must have the same dtype, got ", dtype, ", ", sigma.scalar_type(), " and ",
              proxies.scalar_type());
  const bool supported = dtype == at::kFloat || dtype == at::kDouble ||
                         (reduced_precision && (dtype == at::kHalf || dtype == at::kBFloat16));
  TORCH_CHECK(supported, "pa_ism: mu, sigma and proxies must be ",
              reduced_precision ? "float16, bfloat16, float32 or float64" : "float32 or float64", " on ", device.type(),
              ", got ", dtype);
  TORCH_CHECK(std::isfinite(margin), "pa_ism: margin must be finite, got ", margin);
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "pa_ism: alpha must be a positive finite number, got ", alpha);
  TORCH_CHECK(std::isfinite(ism_offset), "pa_ism: ism_offset must be finite, got ", ism_offset);
  TORCH_CHECK(std::isfinite(ism_scale) && ism_scale > 0, "pa_ism: ism_scale must be a positive finite number, got ",
              ism_scale);
  return {mu.contiguous(), sigma.contiguous(), labels.contiguous(), proxies.contiguous()};
}

// The backward's arguments: the forward's, and its outputs as pa_ism_forward returns them
// for these inputs (statistics in at::toOpMathType of the inputs' dtype). grad_loss is a
// 0-dim floating tensor on the inputs' device or the CPU.
inline BackwardInputs checked_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& mu,
                                              const at::Tensor& sigma, const at::Tensor& labels,
                                              const at::Tensor& proxies, const at::Tensor& dots,
                                              const at::Tensor& row_stats, const at::Tensor& col_stats,
                                              const at::Tensor& num_positive, double margin, double alpha,
                                              double ism_offset, double ism_scale, bool reduced_precision) {
  Inputs in = checked_inputs(mu, sigma, labels, proxies, margin, alpha, ism_offset, ism_scale, reduced_precision);
  const at::Device device = mu.device();
  TORCH_CHECK(grad_loss.defined(), "pa_ism_backward: grad_loss is an undefined tensor");
  TORCH_CHECK(grad_loss.device() == device || grad_loss.device().is_cpu(),
              "pa_ism_backward: grad_loss must be on the inputs' device or the CPU, got ", grad_loss.device());
  TORCH_CHECK(grad_loss.dim() == 0 && at::isFloatingType(grad_loss.scalar_type()),
              "pa_ism_backward: grad_loss must be a 0-dim floating tensor (the loss's gradient), got ", grad_loss.dim(),
              "-D ", grad_loss.scalar_type());
  const int64_t B = mu.size(0), C = proxies.size(0);
  const at::ScalarType stats = at::toOpMathType(mu.scalar_type());
  check_saved(dots, "dots", {B, C}, stats, device);
  check_saved(row_stats, "row_stats", {2, B}, stats, device);
  check_saved(col_stats, "col_stats", {3, C}, stats, device);
  check_saved(num_positive, "num_positive", {}, stats, device);
  return {std::move(in),          grad_loss,
          dots.contiguous(),      row_stats.contiguous(),
          col_stats.contiguous(), num_positive.contiguous()};
}

}  // namespace pa_ism
}  // namespace idml
