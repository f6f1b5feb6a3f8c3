// Autograd of the introspective Proxy Anchor loss, in C++: idml::pa_ism_loss calls the
// forward operator and saves what idml::pa_ism_backward needs. Python's torch.autograd
// machinery (an autograd.Function or torch.library.register_autograd) adds about twice the
// host time per loss evaluation that this does; on a GPU that host time is what the kernels
// wait for. Registered under the Autograd key, the way
// torchvision's C++ ops are, so the same autograd runs from Python, TorchScript and libtorch.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <tuple>

namespace idml {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (margin, alpha, ism, ism_offset, ism_scale), saved for the backward as one value.
using Hyper = std::tuple<double, double, bool, double, double>;

// The operators, looked up once.
const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("idml::pa_ism_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                 double, bool, double, double)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("idml::pa_ism_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, double, double, bool, double, double)>();
  return op;
}

// Passes the loss's gradients through, tied to the loss's inputs: differentiating them
// again (a second derivative, after create_graph) raises, as after Python's
// once_differentiable, rather than silently giving none or wrong ones.
class NoSecondDerivative : public torch::autograd::Function<NoSecondDerivative> {
 public:
  static variable_list forward(AutogradContext*, variable_list grads, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&) {
    return grads;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "idml::pa_ism_loss has no second derivative (its backward kernel is not differentiable)");
  }
};

class PaIsmLoss : public torch::autograd::Function<PaIsmLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& sigma,
                            const at::Tensor& labels, const at::Tensor& proxies, double margin, double alpha, bool ism,
                            double ism_offset, double ism_scale) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, dots, row_stats, col_stats, num_positive] =
        forward_op().call(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale);
    ctx->save_for_backward({mu, sigma, labels, proxies, dots, row_stats, col_stats, num_positive});
    ctx->saved_data["hyper"] = Hyper(margin, alpha, ism, ism_offset, ism_scale);
    ctx->set_materialize_grads(false);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(9);  // no gradient reached the loss
    const variable_list saved = ctx->get_saved_variables();
    const auto [margin, alpha, ism, ism_offset, ism_scale] = ctx->saved_data["hyper"].to<Hyper>();
    const bool create_graph = at::GradMode::is_enabled();
    variable_list grads(3);
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grads[0], grads[1], grads[2]) =
          backward_op().call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                             saved[7], margin, alpha, ism, ism_offset, ism_scale);
    }
    if (create_graph) grads = NoSecondDerivative::apply(grads, saved[0], saved[1], saved[3]);
    return {grads[0],     grads[1],     at::Tensor(), grads[2],    at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor pa_ism_loss_autograd(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& labels,
                                const at::Tensor& proxies, double margin, double alpha, bool ism, double ism_offset,
                                double ism_scale) {
  return PaIsmLoss::apply(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale);
}

// Without autograd (inference mode, fake tensors): the forward operator's loss alone.
at::Tensor pa_ism_loss_no_grad(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& labels,
                               const at::Tensor& proxies, double margin, double alpha, bool ism, double ism_offset,
                               double ism_scale) {
  return std::get<0>(forward_op().call(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(idml, Autograd, m) {
  m.impl("pa_ism_loss", &pa_ism_loss_autograd);
  // Differentiate pa_ism_loss; backpropagating through the bare operators raises.
  m.impl("pa_ism_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("pa_ism_backward", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(idml, CompositeExplicitAutograd, m) { m.impl("pa_ism_loss", &pa_ism_loss_no_grad); }

}  // namespace idml
