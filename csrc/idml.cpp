// Schemas of the idml operators. Kernels live in cpu/*.cpp and cuda/*.cu and register
// themselves per backend (TORCH_LIBRARY_IMPL); kmeans.cpp, made of ATen operations, serves
// every backend; the loss's autograd is autograd.cpp; fake kernels are registered from
// Python in idml/ops.py. The loss's forward and backward are also operators of their own,
// so both can be called from TorchScript and from C++.
// (The Python module that loads them is csrc/module.cpp: these files build without Python.)
#include <torch/library.h>

TORCH_LIBRARY(idml, m) {
  // --- introspective Proxy Anchor loss (docs/method.md, sections 2-3) ---
  // The differentiable loss (a scalar, float32; float64 for float64 inputs): pa_ism_forward's
  // loss, with pa_ism_backward as its derivative in mu, sigma and proxies.
  m.def(
      "pa_ism_loss(Tensor mu, Tensor sigma, Tensor labels, Tensor proxies, float margin=0.1, "
      "float alpha=32.0, bool ism=True, float ism_offset=4.0, float ism_scale=5.0) -> Tensor");
  // Forward returns (loss, dots, row_stats, col_stats, num_positive): the scalar loss
  // (float32, float64 for float64 inputs) and what the backward needs, in that dtype:
  // dots = mu P^T (B x C), row_stats = [|mu_i|^2; |sigma_i|^2] (2 x B),
  // col_stats = [|p_c|^2; positive log-sum-exp; negative log-sum-exp] (3 x C),
  // num_positive = |P+| (0-dim). labels: int64 in [0, C).
  m.def(
      "pa_ism_forward(Tensor mu, Tensor sigma, Tensor labels, Tensor proxies, float margin=0.1, "
      "float alpha=32.0, bool ism=True, float ism_offset=4.0, float ism_scale=5.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward returns (grad_mu, grad_sigma, grad_proxies) in the dtype of the inputs.
  m.def(
      "pa_ism_backward(Tensor grad_loss, Tensor mu, Tensor sigma, Tensor labels, Tensor proxies, "
      "Tensor dots, Tensor row_stats, Tensor col_stats, Tensor num_positive, float margin=0.1, "
      "float alpha=32.0, bool ism=True, float ism_offset=4.0, float ism_scale=5.0) "
      "-> (Tensor, Tensor, Tensor)");

  // --- retrieval metrics (docs/method.md, section 5) ---
  // Ranks of every query's best R = min(#relevant, max_r) same-class items, compared by
  // dot product, ties to the lower index; references = None: every row is a query against
  // all other rows. Returns (ranks [n, cap] int64, 0-padded; num_relevant [n] int64);
  // ranks are exact up to max(R, max_k), larger ones are reported as max(R, max_k) + 1.
  m.def(
      "retrieval_ranks(Tensor queries, Tensor query_labels, Tensor? references, "
      "Tensor? reference_labels, int max_r, int max_k, str precision) -> (Tensor, Tensor)");

  // --- k-means++ seeding (k-means for NMI and F1, docs/method.md, section 5) ---
  // Draws centroids start..stop-1 in place (kmeans.cpp; idml/reference.py has the same
  // loop): each of uniforms[c] (float64 [k, trials]) times sum(closest) falls on a row in the
  // running sum of closest (float64 squared distances to the nearest centroid so far); draw c
  // is the candidate that leaves the least sum of closest (the first on ties), then closest
  // takes the distances to it into account. sq_norms = |x_i|^2; draw 0 is the caller's.
  m.def(
      "kmeans_plus_plus_draws(Tensor x, Tensor sq_norms, Tensor uniforms, Tensor(a!) closest, "
      "Tensor(b!) centroids, int start, int stop) -> ()");
}
