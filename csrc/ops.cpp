// The muonkern._C Python module: importing it defines the muonkern op schemas. The kernels register
// themselves per backend (ns5_cpu.cpp, ns5_cuda.cpp, dirquad_cpu.cpp, dirquad_cuda.cpp).
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <exception>

#include "dirquad.h"
#include "ns5_common.h"
#include "ns5_gram.h"
#ifdef MUONKERN_WITH_CUDA
#include "ns5_graphs.h"
#include "ns5_route.h"
#endif

namespace {

// muonkern._C.ns5_auto_algorithm(m, n, steps): what algorithm="auto" runs in the C++
// kernels, so a test can hold the C++ rule against muonkern.ops.ns5_args.choose_algorithm.
PyObject* ns5_auto_algorithm(PyObject*, PyObject* args) {
  long long m = 0, n = 0, steps = 0;
  if (!PyArg_ParseTuple(args, "LLL", &m, &n, &steps)) return nullptr;
  return PyUnicode_FromString(muonkern::ns5_use_gram("auto", m, n, steps) ? "gram" : "standard");
}

// muonkern._C.cpu_has_avx512_bf16(): the CPU kernel's rule for its bf16 GEMMs (csrc/ns5_gram.h), so
// a test can hold it against the fallback's (torch.cpu._is_avx512_bf16_supported()).
PyObject* cpu_has_avx512_bf16(PyObject*, PyObject*) { return PyBool_FromLong(muonkern::cpu_has_avx512_bf16()); }

// The graph counters of csrc/ns5_graphs.h, for tests: muonkern._C.ns5_cached_graphs() (CUDA graphs
// the ns5 op has captured) and ns5_graph_bytes() (the memory they count against
// MUONKERN_NS5_GRAPH_MB); 0 in a build without CUDA.
#ifdef MUONKERN_WITH_CUDA
int64_t cached_graphs() { return muonkern::ns5_cached_graphs(); }
int64_t graph_bytes() { return muonkern::ns5_graph_bytes(); }
#else
int64_t cached_graphs() { return 0; }
int64_t graph_bytes() { return 0; }
#endif

template <int64_t (*Counter)()>
PyObject* graph_counter(PyObject*, PyObject*) {
  return PyLong_FromLongLong(Counter());
}

#ifdef MUONKERN_WITH_CUDA
// muonkern._C.ns5_cuda_route(batch, m, n, steps, algorithm) -> (path, algorithm, cluster): what the
// CUDA kernel of ns5 runs for `batch` m x n matrices on the current device (csrc/ns5_route.h);
// muonkern.ops.ns5_route wraps it.
PyObject* ns5_cuda_route(PyObject*, PyObject* args) {
  long long batch = 0, m = 0, n = 0, steps = 0;
  const char* algorithm = nullptr;
  if (!PyArg_ParseTuple(args, "LLLLs", &batch, &m, &n, &steps, &algorithm)) return nullptr;
  try {
    const muonkern::Ns5Route route = muonkern::ns5_cuda_route(batch, m, n, steps, algorithm);
    return Py_BuildValue("(ssi)", route.path.c_str(), route.gram ? "gram" : "standard", route.cluster);
  } catch (const c10::ValueError& e) {  // bad arguments
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {  // e.g. no CUDA device
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}
#endif

PyMethodDef methods[] = {
    {"ns5_auto_algorithm", ns5_auto_algorithm, METH_VARARGS, "ns5_auto_algorithm(m, n, steps) -> 'gram' | 'standard'"},
    {"cpu_has_avx512_bf16", cpu_has_avx512_bf16, METH_NOARGS, "cpu_has_avx512_bf16() -> bool"},
    {"ns5_cached_graphs", graph_counter<cached_graphs>, METH_NOARGS, "ns5_cached_graphs() -> int"},
    {"ns5_graph_bytes", graph_counter<graph_bytes>, METH_NOARGS, "ns5_graph_bytes() -> int"},
#ifdef MUONKERN_WITH_CUDA
    {"ns5_cuda_route", ns5_cuda_route, METH_VARARGS,
     "ns5_cuda_route(batch, m, n, steps, algorithm) -> (path, 'gram' | 'standard', cluster)"},
#endif
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "muonkern compiled ops", -1, methods};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(muonkern, m) {
  m.def(muonkern::kNs5Schema);
  m.def(muonkern::kDirquadSchema);
}

// No op here has a derivative. PyTorch's fallback for ops without an Autograd kernel lets backward run
// through the kernels' internals with a warning (a wrong gradient, which differs between the CPU and
// CUDA kernels); this one marks the outputs of a call whose inputs require grad, and backward through
// them raises "derivative for muonkern::<op> is not implemented". ns5_grouped and the Triton routes
// are defined in Python (muonkern/ops/registration.py) when the package registers its ops.
TORCH_LIBRARY_IMPL(muonkern, Autograd, m) {
  for (const char* op : {"ns5", "dirquad", "ns5_grouped", "ns5_symmetric", "ns5_gram_symmetric", "ns5_small"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}
