// culture_neurons.kernels._accumulate: one layer's per-culture K, S, Q on the CPU in one call.
//
// The Python face is culture_neurons.kernels.reduce.accumulate (docstring, checks, and the
// PyTorch path this must equal bit for bit). Why it exists: on small models the PyTorch path's
// dozen small ops per layer (index_add_ per statistic, the fp32 temporaries, the folds) cost
// more than the layer itself; here a layer is one call of a few microseconds.
//
// The same arithmetic as the PyTorch path, in the same order, so the totals are identical:
//   rows are taken chunk_rows at a time; within a chunk, per culture and neuron, fp32 sums of
//   a, of fl(a * a) and of [a > 0] accumulate over the chunk's rows in row order (what
//   index_add_ does); then K += (int64) count, S += (double) sum, Q += (double) sum of squares.
//   Rows whose culture id is outside [0, C) count nothing.
// bf16 inputs are widened to fp32 first (exact), as the PyTorch path's fp32 copy does.
// Built with -ffp-contract=off: a fused multiply-add would round a * a + q once, not twice.
//
// Arguments are raw addresses of C-contiguous CPU tensors the caller has checked (shapes,
// dtypes, device): no torch headers, so the extension builds in seconds.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

inline float widen_bf16(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

template <typename Row, typename Id>
void accumulate_rows(int64_t* __restrict K, double* __restrict S, double* __restrict Q,
                     const Row* __restrict a, const Id* __restrict culture, int64_t C, int64_t N,
                     int64_t R, int64_t chunk_rows) {
  // [C, N] fp32 sums of one chunk per statistic, and the cultures a chunk touched.
  std::vector<float> s(C * N), q(C * N), k(C * N);
  std::vector<float> row(N);
  std::vector<char> touched(C);
  for (int64_t start = 0; start < R; start += chunk_rows) {
    const int64_t stop = std::min(R, start + chunk_rows);
    std::fill(touched.begin(), touched.end(), 0);
    for (int64_t r = start; r < stop; ++r) {
      const int64_t c = static_cast<int64_t>(culture[r]);
      if (c < 0 || c >= C) continue;
      if (!touched[c]) {  // zeroed on first use: a chunk of one culture zeroes one row
        touched[c] = 1;
        std::fill_n(s.data() + c * N, N, 0.0f);
        std::fill_n(q.data() + c * N, N, 0.0f);
        std::fill_n(k.data() + c * N, N, 0.0f);
      }
      const Row* x = a + r * N;
      float* __restrict sc = s.data() + c * N;
      float* __restrict qc = q.data() + c * N;
      float* __restrict kc = k.data() + c * N;
      if constexpr (std::is_same_v<Row, uint16_t>) {
        for (int64_t n = 0; n < N; ++n) row[n] = widen_bf16(x[n]);
      } else {
        std::memcpy(row.data(), x, N * sizeof(float));
      }
      const float* __restrict v = row.data();
      for (int64_t n = 0; n < N; ++n) {
        const float square = v[n] * v[n];
        sc[n] += v[n];
        qc[n] += square;
        kc[n] += v[n] > 0.0f ? 1.0f : 0.0f;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      if (!touched[c]) continue;  // its sums are zeros: adding them changes no total
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = c * N + n;
        K[i] += static_cast<int64_t>(k[i]);
        S[i] += static_cast<double>(s[i]);
        Q[i] += static_cast<double>(q[i]);
      }
    }
  }
}

template <typename Row>
void dispatch_ids(uintptr_t K, uintptr_t S, uintptr_t Q, uintptr_t a, uintptr_t culture,
                  bool ids64, int64_t C, int64_t N, int64_t R, int64_t chunk_rows) {
  auto* k = reinterpret_cast<int64_t*>(K);
  auto* s = reinterpret_cast<double*>(S);
  auto* q = reinterpret_cast<double*>(Q);
  auto* x = reinterpret_cast<const Row*>(a);
  if (ids64) {
    accumulate_rows(k, s, q, x, reinterpret_cast<const int64_t*>(culture), C, N, R, chunk_rows);
  } else {
    accumulate_rows(k, s, q, x, reinterpret_cast<const int32_t*>(culture), C, N, R, chunk_rows);
  }
}

void accumulate(uintptr_t K, uintptr_t S, uintptr_t Q, uintptr_t a, uintptr_t culture,
                bool bf16, bool ids64, int64_t C, int64_t N, int64_t R, int64_t chunk_rows) {
  py::gil_scoped_release release;
  if (bf16) {
    dispatch_ids<uint16_t>(K, S, Q, a, culture, ids64, C, N, R, chunk_rows);
  } else {
    dispatch_ids<float>(K, S, Q, a, culture, ids64, C, N, R, chunk_rows);
  }
}

}  // namespace

PYBIND11_MODULE(_accumulate, m) {
  m.doc() = "Per-culture K, S, Q of one layer's rows; see culture_neurons.kernels.reduce.";
  m.def("accumulate", &accumulate, py::arg("K"), py::arg("S"), py::arg("Q"), py::arg("a"),
        py::arg("culture"), py::arg("bf16"), py::arg("ids64"), py::arg("C"), py::arg("N"),
        py::arg("R"), py::arg("chunk_rows"),
        "Add rows a [R, N] (fp32, or bf16 bits) into K [C, N] int64, S, Q [C, N] float64 by "
        "culture [R] (int32, or int64 if ids64; outside [0, C) = not counted), chunk_rows at a "
        "time. Raw addresses of C-contiguous CPU tensors.");
}
