// Makes the setup.py build importable as ``salstm_kernels._C``: importing it runs the static
// TORCH_LIBRARY registrations in salstm_ops.cpp.  (The CMake build is a plain shared library loaded
// with torch.ops.load_library and does not include this file.)
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                                   "salstm_kernels C++ CPU kernels (torch.ops.salstm_kernels_cpp)", -1, nullptr};
  return PyModule_Create(&def);
}
