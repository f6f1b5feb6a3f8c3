// k-means++ draws (D^2 sampling) as one operator: the loop of idml/reference.py's
// kmeans_plus_plus_draws, the same ATen operations in the same order (so the same
// centroids, bit for bit), issued from C++ for every backend. Each draw depends on the one
// before, and at SOP size (11,316 draws) issuing a draw's operations from Python takes
// longer on the host (about 200 us on an H100 machine) than the device needs to run them
// (about 50 us: one pass over the 124 MB of embeddings); from C++ the host keeps ahead. On a CPU it saves the same
// interpreter time.
//
// Greedy draws (trials > 1, scikit-learn's default): each draw samples `trials` candidates and
// keeps the one that leaves the smallest sum of squared distances to the nearest centroid; the
// candidates' distances to all rows are one [trials, d] x [d, n] product.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace idml {
namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& sq_norms, const at::Tensor& uniforms,
                  const at::Tensor& closest, const at::Tensor& centroids, int64_t start, int64_t stop) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "kmeans_plus_plus_draws: x must be a contiguous float32 or float64 matrix with rows, got ",
              x.scalar_type(), " of shape ", x.sizes());
  const int64_t n = x.size(0);
  TORCH_CHECK(sq_norms.dim() == 1 && sq_norms.size(0) == n && sq_norms.scalar_type() == x.scalar_type() &&
                  sq_norms.is_contiguous(),
              "kmeans_plus_plus_draws: sq_norms must be a contiguous vector of |x_i|^2 of every row, in x's dtype");
  TORCH_CHECK(
      closest.dim() == 1 && closest.size(0) == n && closest.scalar_type() == at::kDouble && closest.is_contiguous(),
      "kmeans_plus_plus_draws: closest must be a contiguous float64 vector, one per row");
  TORCH_CHECK(
      uniforms.dim() == 2 && uniforms.size(1) >= 1 && uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous(),
      "kmeans_plus_plus_draws: uniforms must be a contiguous float64 [k, trials] matrix, trials >= 1, got ",
      uniforms.scalar_type(), " of shape ", uniforms.sizes());
  const int64_t k = uniforms.size(0);
  TORCH_CHECK(centroids.dim() == 2 && centroids.size(0) == k && centroids.size(1) == x.size(1) &&
                  centroids.scalar_type() == x.scalar_type() && centroids.is_contiguous(),
              "kmeans_plus_plus_draws: centroids must be a contiguous [k, d] matrix in x's dtype, k = ", k,
              " (the uniforms' rows)");
  for (const at::Tensor* t : {&sq_norms, &uniforms, &closest, &centroids}) {
    TORCH_CHECK(t->device() == x.device(), "kmeans_plus_plus_draws: every tensor must be on x's device (", x.device(),
                "), got one on ", t->device());
  }
  TORCH_CHECK(1 <= start && start <= stop && stop <= k, "kmeans_plus_plus_draws: draws [", start, ", ", stop,
              ") must lie within [1, ", k, "]: draw 0 is the caller's");
}

void kmeans_plus_plus_draws(const at::Tensor& x, const at::Tensor& sq_norms, const at::Tensor& uniforms,
                            at::Tensor closest, at::Tensor centroids, int64_t start, int64_t stop) {
  check_inputs(x, sq_norms, uniforms, closest, centroids, start, stop);
  const int64_t n = x.size(0), trials = uniforms.size(1);
  // Every intermediate allocated once: the loop's host time per draw is what this operator
  // is for, and each allocation is a call into the caching allocator.
  at::Tensor cumulative = at::empty_like(closest), targets = at::empty({trials}, closest.options());
  at::Tensor indices = at::empty({trials}, x.options().dtype(at::kLong));
  at::Tensor candidate_sq = at::empty({trials}, sq_norms.options());
  at::Tensor distances = at::empty({trials, n}, sq_norms.options());
  // One trial: a matrix-vector product straight into the centroids' row (the single draw).
  // Several: the candidates, the nearest distances each would leave, and their sums.
  at::Tensor candidates, reduced, potentials, best, zero;
  if (trials > 1) {
    candidates = at::empty({trials, x.size(1)}, x.options());
    zero = at::zeros({}, closest.options());
    reduced = at::empty({trials, n}, closest.options());
    potentials = at::empty({trials}, closest.options());
    best = at::empty({1}, indices.options());
  }
  for (int64_t c = start; c < stop; ++c) {
    at::cumsum_out(cumulative, closest, 0);
    at::mul_out(targets, uniforms[c], cumulative.narrow(0, n - 1, 1));
    at::searchsorted_out(indices, cumulative, targets, /*out_int32=*/false, /*right=*/true);
    indices.clamp_max_(n - 1);
    at::Tensor centroid = centroids.narrow(0, c, 1);
    at::index_select_out(candidate_sq, sq_norms, 0, indices);
    if (trials == 1) {
      at::index_select_out(centroid, x, 0, indices);
      at::Tensor row = distances[0];
      at::add_out(row, sq_norms, candidate_sq).addmv_(x, centroid[0], 1, -2);
      at::minimum_out(closest, closest, row.clamp_min_(0));
      continue;
    }
    at::index_select_out(candidates, x, 0, indices);
    at::add_out(distances, sq_norms, candidate_sq.unsqueeze(1)).addmm_(candidates, x.t(), 1, -2);
    // max(distance, 0) then the least with closest (never negative), in one pass.
    at::clamp_out(reduced, distances, zero, closest);
    at::sum_out(potentials, reduced, 1);
    at::argmin_out(best, potentials, 0, /*keepdim=*/true);  // the first of equal sums
    at::index_select_out(centroid, candidates, 0, best);
    at::Tensor kept = closest.unsqueeze(0);
    at::index_select_out(kept, reduced, 0, best);
  }
}

}  // namespace
}  // namespace idml

// ATen operations only, so one kernel serves every backend.
TORCH_LIBRARY_IMPL(idml, CompositeExplicitAutograd, m) {
  m.impl("kmeans_plus_plus_draws", &idml::kmeans_plus_plus_draws);
}
