// barnfast.data._native: the packing half of the micro-batch planner (barnfast/data/packing.py), in C++.
//
// pack_steps(order, lengths, global_batch, world_size, token_budget,
//            micro_samples_out, micro_offsets_out, bins_per_rank_out) -> num_micro_batches
//
//   order          (N,)      int64 sample indices in data order; step s = order[s*G : (s+1)*G]
//   lengths        (n,)      int64 token length of every sample (> 0)
//   micro_samples  (N,)      int64, written: sample indices grouped by micro-batch
//   micro_offsets  (>= N+1,) int64, written: the first M+1 entries
//   bins_per_rank  (S*W,)    int64, written: micro-batches of (step s, rank r) at s*W + r
//
// Same algorithm and tie-breaks as `_pack_steps_numpy` (the module docstring there is the
// specification): per step, longest-processing-time across ranks (longest sample first, ties by
// position; least-loaded rank, ties to the lowest), then first-fit-decreasing per rank under the
// budget, samples inside a micro-batch in data order. Output buffers are allocated by the caller,
// so no numpy C API is needed; the GIL is released while packing.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <queue>
#include <string_view>
#include <utility>
#include <vector>

namespace {

struct Buf {
  Py_buffer view{};
  bool held = false;
  ~Buf() {
    if (held) PyBuffer_Release(&view);
  }
  bool get(PyObject* obj, bool writable, const char* name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &view, flags) != 0) return false;
    held = true;
    if (view.itemsize != 8 || view.ndim != 1 || !view.format ||
        (std::string_view(view.format) != "l" && std::string_view(view.format) != "q")) {
      PyErr_Format(PyExc_TypeError, "%s must be a 1-D contiguous int64 array", name);
      return false;
    }
    return true;
  }
  int64_t* data() const { return static_cast<int64_t*>(view.buf); }
  Py_ssize_t size() const { return view.len / 8; }
};

// Packs every step; returns the number of micro-batches, or -1 if a sample index is out of range.
int64_t pack_steps(const int64_t* order, int64_t N, const int64_t* lengths, int64_t n, int64_t G,
                   int64_t W, int64_t budget, int64_t* micro_samples, int64_t* micro_offsets,
                   int64_t* bins_per_rank) {
  std::vector<int64_t> len(std::min(G, N)), idx(std::min(G, N)), rem;
  std::vector<std::vector<int64_t>> rank_items(W), bins;
  using Load = std::pair<int64_t, int64_t>;  // (tokens, rank): the heap top is the least loaded, lowest rank
  int64_t m = 0, out = 0;
  micro_offsets[0] = 0;
  for (int64_t start = 0, s = 0; start < N; start += G, ++s) {
    const int64_t cnt = std::min(G, N - start);
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t i = order[start + j];
      if (i < 0 || i >= n) return -1;
      len[j] = lengths[i];
      idx[j] = j;
    }
    std::sort(idx.begin(), idx.begin() + cnt, [&](int64_t a, int64_t b) {
      return len[a] > len[b] || (len[a] == len[b] && a < b);
    });
    std::priority_queue<Load, std::vector<Load>, std::greater<Load>> heap;
    for (int64_t r = 0; r < W; ++r) {
      heap.emplace(0, r);
      rank_items[r].clear();
    }
    for (int64_t t = 0; t < cnt; ++t) {
      const int64_t j = idx[t];
      auto [load, r] = heap.top();
      heap.pop();
      rank_items[r].push_back(j);
      heap.emplace(load + len[j], r);
    }
    for (int64_t r = 0; r < W; ++r) {
      rem.clear();
      bins.clear();
      for (int64_t j : rank_items[r]) {  // already longest first
        size_t b = 0;
        while (b < rem.size() && rem[b] < len[j]) ++b;
        if (b == rem.size()) {  // an over-budget sample opens a bin left at a negative remainder
          rem.push_back(budget);
          bins.emplace_back();
        }
        rem[b] -= len[j];
        bins[b].push_back(j);
      }
      for (auto& bin : bins) {
        std::sort(bin.begin(), bin.end());  // data order inside a micro-batch
        for (int64_t j : bin) micro_samples[out++] = order[start + j];
        micro_offsets[++m] = out;
      }
      bins_per_rank[s * W + r] = static_cast<int64_t>(bins.size());
    }
  }
  return m;
}

PyObject* py_pack_steps(PyObject*, PyObject* args) {
  PyObject *order_o, *len_o, *ms_o, *mo_o, *bpr_o;
  long long G, W, budget;
  if (!PyArg_ParseTuple(args, "OOLLLOOO", &order_o, &len_o, &G, &W, &budget, &ms_o, &mo_o, &bpr_o))
    return nullptr;
  if (G < 1 || W < 1 || budget < 1) {
    PyErr_SetString(PyExc_ValueError, "global_batch, world_size and token_budget must be >= 1");
    return nullptr;
  }
  Buf order, lens, ms, mo, bpr;
  if (!order.get(order_o, false, "order") || !lens.get(len_o, false, "lengths") ||
      !ms.get(ms_o, true, "micro_samples") || !mo.get(mo_o, true, "micro_offsets") ||
      !bpr.get(bpr_o, true, "bins_per_rank"))
    return nullptr;
  const int64_t N = order.size(), steps = (N + G - 1) / G;
  if (ms.size() < N || mo.size() < N + 1 || bpr.size() < steps * W) {
    PyErr_SetString(PyExc_ValueError, "output buffers too small");
    return nullptr;
  }
  int64_t m;
  Py_BEGIN_ALLOW_THREADS
  m = pack_steps(order.data(), N, lens.data(), lens.size(), G, W, budget, ms.data(), mo.data(),
                 bpr.data());
  Py_END_ALLOW_THREADS
  if (m < 0) {
    PyErr_SetString(PyExc_IndexError, "order holds a sample index outside lengths");
    return nullptr;
  }
  return PyLong_FromLongLong(m);
}

PyMethodDef methods[] = {
    {"pack_steps", py_pack_steps, METH_VARARGS,
     "pack_steps(order, lengths, global_batch, world_size, token_budget, micro_samples_out, "
     "micro_offsets_out, bins_per_rank_out) -> number of micro-batches"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                      "barnfast native helpers: the micro-batch planner's packing (csrc/planner.cpp).",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__native() { return PyModule_Create(&module); }
