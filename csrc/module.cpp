// Makes the shared library importable as the Python module npn_kernels._C; loading it runs the
// static TORCH_LIBRARY_IMPL registrations. It exposes no Python functions of its own.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
