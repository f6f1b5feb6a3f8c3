// Autograd of the introspective Proxy Anchor loss, in C++: idml::pa_ism_loss calls the
// forward operator and saves what idml::pa_ism_backward needs. Python's torch.autograd
// machinery (an autograd.Function or torch.library.register_autograd) cost the host 2-3
// times the forward and backward operators' own dispatch at small sizes, on every loss
// evaluation; on a GPU that host time is what the kernels wait for (bench/RESULTS.md,
// session 8). Registered under the Autograd key, the way torchvision's C++ ops are, so
// the same autograd runs from Python, TorchScript and libtorch.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace idml {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, bool, double,
    double);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, bool, double,
    double);

at::Tensor pa_ism_forward_loss(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& labels,
                               const at::Tensor& proxies, double margin, double alpha, bool ism,
                               double ism_offset, double ism_scale, AutogradContext* ctx) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("idml::pa_ism_forward", "")
                             .typed<ForwardSignature>();
  auto [loss, dots, row_stats, col_stats, num_positive] =
      op.call(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale);
  if (ctx != nullptr) {
    ctx->save_for_backward({mu, sigma, labels, proxies, dots, row_stats, col_stats, num_positive});
  }
  return loss;
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
                            const at::Tensor& labels, const at::Tensor& proxies, double margin, double alpha,
                            bool ism, double ism_offset, double ism_scale) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["hyper"] = c10::List<double>({margin, alpha, ism_offset, ism_scale});
    ctx->saved_data["ism"] = ism;
    ctx->set_materialize_grads(false);
    return pa_ism_forward_loss(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale, ctx);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(9);  // no gradient reached the loss
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("idml::pa_ism_backward", "")
                               .typed<BackwardSignature>();
    const variable_list saved = ctx->get_saved_variables();
    const c10::List<double> hyper = ctx->saved_data["hyper"].toDoubleList();
    const bool ism = ctx->saved_data["ism"].toBool();
    const bool create_graph = at::GradMode::is_enabled();
    variable_list grads(3);
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grads[0], grads[1], grads[2]) =
          op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                  saved[7], hyper[0], hyper[1], ism, hyper[2], hyper[3]);
    }
    if (create_graph) grads = NoSecondDerivative::apply(grads, saved[0], saved[1], saved[3]);
    return {grads[0], grads[1], at::Tensor(), grads[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor pa_ism_loss_autograd(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& labels,
                                const at::Tensor& proxies, double margin, double alpha, bool ism,
                                double ism_offset, double ism_scale) {
  return PaIsmLoss::apply(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale);
}

// Without autograd (inference mode, fake tensors): the forward operator's loss alone.
at::Tensor pa_ism_loss_no_grad(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& labels,
                               const at::Tensor& proxies, double margin, double alpha, bool ism,
                               double ism_offset, double ism_scale) {
  return pa_ism_forward_loss(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale, nullptr);
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
