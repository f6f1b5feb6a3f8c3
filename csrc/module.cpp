// The Python module idml._C. `import idml._C` only has to load the library: the static
// initialisers of idml.cpp and the kernels register the operators. No Python bindings are
// needed, so the limited API suffices.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
