// Makes the library importable as the Python module fastnas._C: importing it runs the static operator registrations.
// (The CMake build leaves this file out and is loaded with torch.ops.load_library instead.)
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastnas compiled kernels (operators in torch.ops.fastnas)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
