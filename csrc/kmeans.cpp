// k-means++ draws (D^2 sampling) as one operator: the loop of idml/reference.py's
// kmeans_plus_plus_draws, the same ATen operations in the same order (so the same
// centroids, bit for bit), issued from C++ for every backend. Each draw depends on the one
// before, and at SOP size (11,316 draws) each took about 200 us of Python's host time on an
// H100 (bench/RESULTS.md, session 7) while the device needs about 50 us for it (one
// matrix-vector product over the 124 MB of embeddings); from C++ the host issues a draw's
// operations faster than the device runs them. On a CPU it saves the same interpreter time.
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
  const int64_t n = x.size(0), k = uniforms.numel();
  TORCH_CHECK(sq_norms.dim() == 1 && sq_norms.size(0) == n && sq_norms.scalar_type() == x.scalar_type(),
              "kmeans_plus_plus_draws: sq_norms must hold |x_i|^2 of every row, in x's dtype");
  TORCH_CHECK(closest.dim() == 1 && closest.size(0) == n && closest.scalar_type() == at::kDouble &&
                  closest.is_contiguous(),
              "kmeans_plus_plus_draws: closest must be a contiguous float64 vector, one per row");
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.scalar_type() == at::kDouble,
              "kmeans_plus_plus_draws: uniforms must be a float64 vector, one per centroid");
  TORCH_CHECK(centroids.dim() == 2 && centroids.size(0) == k && centroids.size(1) == x.size(1) &&
                  centroids.scalar_type() == x.scalar_type() && centroids.is_contiguous(),
              "kmeans_plus_plus_draws: centroids must be a contiguous [k, d] matrix in x's dtype, k = ",
              k, " (the uniforms)");
  for (const at::Tensor* t : {&sq_norms, &uniforms, &closest, &centroids}) {
    TORCH_CHECK(t->device() == x.device(), "kmeans_plus_plus_draws: every tensor must be on x's device (",
                x.device(), "), got one on ", t->device());
  }
  TORCH_CHECK(1 <= start && start <= stop && stop <= k, "kmeans_plus_plus_draws: draws [", start, ", ", stop,
              ") must lie within [1, ", k, "]: draw 0 is the caller's");
}

void kmeans_plus_plus_draws(const at::Tensor& x, const at::Tensor& sq_norms, const at::Tensor& uniforms,
                            at::Tensor closest, at::Tensor centroids, int64_t start, int64_t stop) {
  check_inputs(x, sq_norms, uniforms, closest, centroids, start, stop);
  const int64_t n = x.size(0);
  // Every intermediate allocated once: the loop's host time per draw is what this operator
  // is for, and each allocation is a call into the caching allocator.
  at::Tensor cumulative = at::empty_like(closest), target = at::empty({1}, closest.options());
  at::Tensor index = at::empty({1}, x.options().dtype(at::kLong));
  at::Tensor centroid_sq = at::empty({1}, sq_norms.options()), distances = at::empty_like(sq_norms);
  for (int64_t c = start; c < stop; ++c) {
    at::cumsum_out(cumulative, closest, 0);
    at::mul_out(target, uniforms.narrow(0, c, 1), cumulative.narrow(0, n - 1, 1));
    at::searchsorted_out(index, cumulative, target, /*out_int32=*/false, /*right=*/true);
    index.clamp_max_(n - 1);
    at::Tensor centroid = centroids.narrow(0, c, 1);
    at::index_select_out(centroid, x, 0, index);
    at::index_select_out(centroid_sq, sq_norms, 0, index);
    at::add_out(distances, sq_norms, centroid_sq).addmv_(x, centroid[0], 1, -2);
    at::minimum_out(closest, closest, distances.clamp_min_(0));
  }
}

}  // namespace
}  // namespace idml

// ATen operations only, so one kernel serves every backend.
TORCH_LIBRARY_IMPL(idml, CompositeExplicitAutograd, m) {
  m.impl("kmeans_plus_plus_draws", &idml::kmeans_plus_plus_draws);
}
