// Runs the CUDA kernels of csrc/cuda/ under the host emulation (emulated_cuda.h) and compares
// them with the CPU kernels of the same operators (themselves tested against
// idml/reference.py). Built and run by tests/test_emulated_cuda.py, which generates the two
// included bodies from the .cu files; prints one line per failure and exits 1 if any.
#include "emulated_cuda.h"

#include "pa_ism_body.inc"
#include "retrieval_body.inc"

#include <ATen/core/dispatch/Dispatcher.h>

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// max |a - b| / max |b|, or the normwise ||a - b|| / ||b|| for the half types, whose single
// elements round coarsely.
double error(const at::Tensor& a, const at::Tensor& b, bool normwise) {
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  if (y.numel() == 0) return x.numel() == 0 ? 0.0 : 1.0;
  const double scale = (normwise ? y.norm() : y.abs().max()).item<double>();
  const double difference = (normwise ? (x - y).norm() : (x - y).abs().max()).item<double>();
  return scale > 0 ? difference / scale : difference;
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, bool, double, double);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                double, double, bool, double, double);

// Inputs as tests/test_pa_ism_op.py makes them: row norms spread over [0.1, 3], relu-like
// sigma, a proxy with many positives and one sample exactly on its proxy.
void check_pa_ism(int64_t B, int64_t C, int64_t D, at::ScalarType dtype, bool ism, int sm_count) {
  emulated_sm_count = sm_count;
  const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor mu = at::randn({B, D}, f64) * at::empty({B, 1}, f64).uniform_(0.1, 3);
  at::Tensor sigma = (at::randn({B, D}, f64) * at::empty({B, 1}, f64).uniform_(0.1, 3)).relu();
  const at::Tensor proxies64 = at::randn({C, D}, f64) * 0.5;
  at::Tensor labels = at::randint(0, C, {B}, at::TensorOptions().dtype(at::kLong));
  if (B > 4) labels.slice(0, 0, B / 4).fill_(labels[0].item<int64_t>());
  if (B > 3 && C > 7) {
    labels[3] = 7;
    mu[3] = proxies64[7];
  }
  mu = mu.to(dtype), sigma = sigma.to(dtype);
  const at::Tensor proxies = proxies64.to(dtype);
  const double margin = 0.1, alpha = 32.0, offset = 4.0, scale = 5.0;
  auto [loss, dots, rows, cols, positives] =
      idml::pa_ism_forward_cuda(mu, sigma, labels, proxies, margin, alpha, ism, offset, scale);
  const at::Tensor grad_loss = at::scalar_tensor(0.7, loss.options());
  auto [grad_mu, grad_sigma, grad_proxies] = idml::pa_ism_backward_cuda(
      grad_loss, mu, sigma, labels, proxies, dots, rows, cols, positives, margin, alpha, ism, offset, scale);

  static auto cpu_forward = c10::Dispatcher::singleton().findSchemaOrThrow("idml::pa_ism_forward", "").typed<Forward>();
  static auto cpu_backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("idml::pa_ism_backward", "").typed<Backward>();
  const at::ScalarType cpu_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor m = mu.to(cpu_type), s = sigma.to(cpu_type), p = proxies.to(cpu_type);
  auto [r_loss, r_dots, r_rows, r_cols, r_positives] =
      cpu_forward.call(m, s, labels, p, margin, alpha, ism, offset, scale);
  auto [r_mu, r_sigma, r_proxies] = cpu_backward.call(at::scalar_tensor(0.7, r_loss.options()), m, s, labels, p, r_dots,
                                                      r_rows, r_cols, r_positives, margin, alpha, ism, offset, scale);

  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  // The same tolerances as the CUDA tests (tests/test_pa_ism_op.py).
  const double loss_tol = dtype == at::kDouble ? 1e-12 : half ? 1e-4 : 1e-5;
  const double grad_tol = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-5 : dtype == at::kHalf ? 5e-3 : 2e-2;
  const std::string where = std::string("pa_ism ") + c10::toString(dtype) + " B=" + std::to_string(B) +
                            " C=" + std::to_string(C) + " D=" + std::to_string(D) + " ism=" + std::to_string(ism) +
                            " SMs=" + std::to_string(sm_count) + ": ";
  expect(error(loss, r_loss, false) <= loss_tol, where + "loss");
  expect(error(cols, r_cols, false) <= loss_tol, where + "column log-sum-exps");
  expect(at::equal(positives.to(at::kDouble), r_positives.to(at::kDouble)), where + "|P+|");
  // Gradients below float16's subnormals (a saturated loss at B = C = 1) flush to zero.
  const bool tiny = dtype == at::kHalf && r_mu.abs().max().item<double>() < 1e-7;
  const at::Tensor grads[] = {grad_mu, grad_sigma, grad_proxies}, expected[] = {r_mu, r_sigma, r_proxies};
  const char* names[] = {"grad mu", "grad sigma", "grad proxies"};
  for (int k = 0; k < 3; ++k) {
    expect(grads[k].scalar_type() == dtype && at::isfinite(grads[k]).all().item<bool>(),
           where + names[k] + " dtype, finite");
    if (!tiny) expect(error(grads[k], expected[k], half) <= grad_tol, where + names[k]);
  }
}

// An empty batch has no loss: the kernel refuses it (csrc/pa_ism.h's checks) before any launch.
void check_pa_ism_refuses_an_empty_batch() {
  const at::Tensor mu = at::randn({0, 4}), proxies = at::randn({5, 4});
  const at::Tensor labels = at::zeros({0}, at::TensorOptions().dtype(at::kLong));
  bool refused = false;
  try {
    idml::pa_ism_forward_cuda(mu, mu, labels, proxies, 0.1, 32.0, true, 4.0, 5.0);
  } catch (const c10::Error&) {
    refused = true;
  }
  expect(refused, "pa_ism B=0: refused");
}

// GradScaler's 2^16 loss scale: exactly 2^16 times the unscaled float16 gradients.
void check_pa_ism_loss_scale() {
  const int64_t B = 48, C = 97, D = 16;
  const at::Tensor mu = (at::randn({B, D}) * 2).to(at::kHalf), sigma = at::randn({B, D}).relu().to(at::kHalf);
  const at::Tensor proxies = (at::randn({C, D}) * 0.5).to(at::kHalf);
  at::Tensor labels = at::randint(0, C, {B}, at::TensorOptions().dtype(at::kLong));
  labels.slice(0, 0, 12).fill_(labels[0].item<int64_t>());
  auto [loss, dots, rows, cols, positives] = idml::pa_ism_forward_cuda(mu, sigma, labels, proxies, 0.1, 32, true, 4, 5);
  auto backward = [&](double grad) {
    auto [a, b, c] = idml::pa_ism_backward_cuda(at::scalar_tensor(grad, loss.options()), mu, sigma, labels, proxies,
                                                dots, rows, cols, positives, 0.1, 32, true, 4, 5);
    return std::vector<at::Tensor>{a, b, c};
  };
  const std::vector<at::Tensor> plain = backward(1.0), scaled = backward(65536.0);
  for (int k = 0; k < 3; ++k) {
    expect(at::isfinite(scaled[k]).all().item<bool>() &&
               at::equal(scaled[k].to(at::kFloat) / 65536.0, plain[k].to(at::kFloat)),
           "pa_ism float16 gradient " + std::to_string(k) + " under a 2^16 loss scale");
  }
}

using Ranks = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, int64_t, int64_t, c10::string_view);

// Rows near their class centre on a 1/8 grid (exact products: every tie is a true tie),
// exact duplicate rows and classes of one image, as tests/test_retrieval_op.py makes them.
std::pair<at::Tensor, at::Tensor> clustered(int64_t n, int64_t classes, int64_t singletons) {
  at::Tensor labels = at::randint(0, classes, {n}, at::TensorOptions().dtype(at::kLong));
  if (singletons > 0) labels.slice(0, 0, singletons).copy_(at::arange(classes, classes + singletons, at::kLong));
  const at::Tensor centres = at::randn({classes + singletons, 5}) * 2;
  at::Tensor x = at::round((centres.index_select(0, labels) + at::randn({n, 5})) * 8) / 8;
  for (int64_t k = 0; k < n / 10; ++k)
    x[at::randint(0, n, {1}).item<int64_t>()] = x[at::randint(0, n, {1}).item<int64_t>()];
  return {x.contiguous(), labels};
}

// The CUDA backend in the shared driver (retrieval.h), with tiles small enough that the
// symmetric diagonal, partial tiles, several tiles per row and several chunks of bands all
// occur, with the diagonal square in a block's first tile (CUDA's way) or in strips (the CPU's).
void check_retrieval(int64_t n, int64_t classes, bool gallery, int64_t max_r, int64_t max_k, const char* precision,
                     int64_t band_rows, int64_t tile_rows, int64_t tile_elements, int64_t diagonal_cols) {
  auto [x, labels] = clustered(n, classes, gallery ? 0 : 3);
  std::optional<at::Tensor> references, reference_labels;
  if (gallery) std::tie(references, reference_labels) = clustered(n * 2 / 3 + 1, classes, 0);
  idml::retrieval::Backend backend = idml::cuda_backend();
  backend.band_rows = band_rows, backend.tile_rows = tile_rows, backend.tile_elements = tile_elements;
  backend.diagonal_cols = diagonal_cols;
  auto [ranks, relevant] =
      idml::retrieval::compute_ranks(x, labels, references, reference_labels, max_r, max_k, precision, backend);
  static auto cpu = c10::Dispatcher::singleton().findSchemaOrThrow("idml::retrieval_ranks", "").typed<Ranks>();
  auto [r_ranks, r_relevant] = cpu.call(x, labels, references, reference_labels, max_r, max_k, precision);
  expect(ranks.sizes() == r_ranks.sizes() && at::equal(ranks, r_ranks) && at::equal(relevant, r_relevant),
         std::string("retrieval ") + precision + " n=" + std::to_string(n) + " classes=" + std::to_string(classes) +
             (gallery ? " gallery" : " symmetric") + " max_r=" + std::to_string(max_r) +
             " max_k=" + std::to_string(max_k) + " tiles " + std::to_string(band_rows) + "/" +
             std::to_string(tile_rows) + "/" + std::to_string(tile_elements) + "/" + std::to_string(diagonal_cols));
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16})
    for (bool ism : {true, false}) {
      check_pa_ism(33, 70, 40, dtype, ism, 132);
      check_pa_ism(33, 70, 40, dtype, ism, 1);  // few row warps: rows strided over them
      check_pa_ism(1, 1, 8, dtype, ism, 132);
      check_pa_ism(5, 33, 3, dtype, ism, 2);
    }
  check_pa_ism_refuses_an_empty_batch();
  check_pa_ism(64, 200, 64, at::kFloat, true, 4);
  check_pa_ism(40, 3000, 16, at::kFloat, true, 1);     // more blocks than one wave holds
  check_pa_ism(120, 11318, 8, at::kFloat, true, 132);  // SOP's classes: more blocks than a reduction's threads
  // More rows than one staged chunk (kRowChunk): the row loop runs over several chunks.
  for (bool ism : {true, false}) check_pa_ism(300, 70, 8, at::kFloat, ism, 132);
  check_pa_ism(300, 70, 8, at::kDouble, true, 1);  // 21 row warps: chunks of 252
  check_pa_ism_loss_scale();
  const idml::retrieval::Backend cuda = idml::cuda_backend();  // its own tile sizes first
  for (const char* precision : {"fp32", "tf32", "bf16"})
    for (bool gallery : {false, true})
      for (auto [n, classes] : {std::pair<int64_t, int64_t>{7, 3}, {300, 20}, {700, 5}})
        for (auto [max_r, max_k] : {std::pair<int64_t, int64_t>{1023, 1 << 20}, {3, 4}, {5, 1}})
          for (auto [band, rows, elements, diagonal] :
               {std::tuple<int64_t, int64_t, int64_t, int64_t>{cuda.band_rows, cuda.tile_rows, cuda.tile_elements,
                                                               cuda.diagonal_cols},
                {7, 40, 40 * 33, 0},
                {16, 90, 5000, 0},
                {7, 40, 40 * 33, 16}})
            check_retrieval(n, classes, gallery, max_r, max_k, precision, band, rows, elements, diagonal);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
