// dit_kernels._C: an empty Python module. Importing it loads this shared library,
// which runs the static TORCH_LIBRARY registrars of every op in csrc/. No pybind11,
// so the extension can use the Python limited API (one wheel across CPython versions).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
