// Schemas of the idml operators. Kernels live in cpu/*.cpp and cuda/*.cu and register
// themselves per backend (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered
// from Python in idml/ops.py. Forward and backward are separate operators so both can be
// called from TorchScript and from C++.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import idml._C` only has to load this library: the static initialisers below register
// the operators. No Python bindings are needed, so the limited API suffices.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(idml, m) {
  // --- introspective Proxy Anchor loss (IDML_METHOD.md sections 2-3) ---

  // --- retrieval metrics (IDML_METHOD.md section 5) ---
  // Ranks of every query's best R = min(#relevant, max_r) same-class items, compared by
  // dot product, ties to the lower index; references = None: every row is a query against
  // all other rows. Returns (ranks [n, cap] int64, 0-padded; num_relevant [n] int64);
  // ranks are exact up to max(R, max_k), larger ones are reported as max(R, max_k) + 1.
  m.def(
      "retrieval_ranks(Tensor queries, Tensor query_labels, Tensor? references, "
      "Tensor? reference_labels, int max_r, int max_k, str precision) -> (Tensor, Tensor)");
}
