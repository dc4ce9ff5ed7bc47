// The muonkern._C Python module: importing it defines the muonkern op schemas. The kernels register
// themselves per backend (ns5_cpu.cpp, ns5_cuda.cpp, dirquad_cpu.cpp, dirquad_cuda.cpp).
#include <Python.h>
#include <torch/library.h>

#include "dirquad.h"
#include "ns5_common.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "muonkern compiled ops", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(muonkern, m) {
  m.def(muonkern::kNs5Schema);
  m.def(muonkern::kDirquadSchema);
}
