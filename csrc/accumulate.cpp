// culture_neurons.kernels._accumulate: one layer's per-culture K, S, Q on the CPU in one call
// (accumulate), and a forward's per-row culture ids and counts in another (item_rows, below).
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
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

inline float widen_bf16(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

inline float widen(float x) { return x; }
inline float widen(uint16_t bits) { return widen_bf16(bits); }

// One row into its culture's fp32 sums (bf16 rows widened on the way, exact).
template <typename Row>
__attribute__((always_inline)) inline void add_row_body(float* __restrict s, float* __restrict q,
                                                        float* __restrict k,
                                                        const Row* __restrict x, int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    const float v = widen(x[n]);
    const float square = v * v;
    s[n] += v;
    q[n] += square;
    k[n] += v > 0.0f ? 1.0f : 0.0f;
  }
}

// Cloned for AVX2 on x86-64 (the loader picks the variant the CPU runs): the per-element
// operations and their order are the same in every variant, and without contraction the sums
// are identical bit for bit. AVX2 takes 0.55x (fp32) and 0.5x (bf16) the time of a layer of
// 1024 rows x 4736 neurons where the CPU has it, and at realistic widths this loop is the
// whole cost of a layer's statistics.
#if defined(__x86_64__) && defined(__GNUC__)
#define CN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CN_CLONES
#endif

CN_CLONES void add_row(float* s, float* q, float* k, const float* x, int64_t N) {
  add_row_body(s, q, k, x, N);
}

CN_CLONES void add_row(float* s, float* q, float* k, const uint16_t* x, int64_t N) {
  add_row_body(s, q, k, x, N);
}

// Scratch per thread, kept between calls (every layer of every forward calls this: no
// allocation and no zeroing of untouched cultures per call).
struct Scratch {
  std::vector<float> s, q, k;
  std::vector<char> touched;
};

template <typename Row, typename Id>
void accumulate_rows(int64_t* __restrict K, double* __restrict S, double* __restrict Q,
                     const Row* __restrict a, const Id* __restrict culture, int64_t C, int64_t N,
                     int64_t R, int64_t chunk_rows) {
  // [C, N] fp32 sums of one chunk per statistic, and the cultures a chunk touched.
  thread_local Scratch scratch;
  for (auto* buf : {&scratch.s, &scratch.q, &scratch.k}) {
    if (static_cast<int64_t>(buf->size()) < C * N) buf->resize(C * N);
  }
  if (static_cast<int64_t>(scratch.touched.size()) < C) scratch.touched.resize(C);
  float* s = scratch.s.data();
  float* q = scratch.q.data();
  float* k = scratch.k.data();
  char* touched = scratch.touched.data();
  for (int64_t start = 0; start < R; start += chunk_rows) {
    const int64_t stop = std::min(R, start + chunk_rows);
    std::fill_n(touched, C, 0);
    for (int64_t r = start; r < stop; ++r) {
      const int64_t c = static_cast<int64_t>(culture[r]);
      if (c < 0 || c >= C) continue;
      if (!touched[c]) {  // zeroed on first use: a chunk of one culture zeroes one row
        touched[c] = 1;
        std::fill_n(s + c * N, N, 0.0f);
        std::fill_n(q + c * N, N, 0.0f);
        std::fill_n(k + c * N, N, 0.0f);
      }
      add_row(s + c * N, q + c * N, k + c * N, a + r * N, N);
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

// A forward's row ids and counts from one culture id per item (set_batch's per-forward work
// on the CPU; culture_neurons.instrument.rows.item_rows is the Python face and the PyTorch
// path this equals). weights [B, T] (elem_size 1, 4 or 8: bool / int32 / int64; nonzero =
// the token counts); rows [B * T] int32 = ids[b] where the token counts, else -1; counts
// [2, C] int64 += (counted tokens, items) of the items whose id c is in [0, C).
template <typename W>
void item_rows_of(const W* __restrict w, const std::vector<int64_t>& ids, int64_t T, int64_t C,
                  int32_t* __restrict rows, int64_t* __restrict counts) {
  const int64_t B = static_cast<int64_t>(ids.size());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = ids[b];
    int64_t tokens = 0;
    for (int64_t t = 0; t < T; ++t) {
      const bool counted = w[b * T + t] != 0;
      rows[b * T + t] = counted ? static_cast<int32_t>(c) : -1;
      tokens += counted;
    }
    if (c >= 0 && c < C) {
      counts[c] += tokens;
      counts[C + c] += 1;
    }
  }
}

void item_rows(uintptr_t weights, int64_t elem_size, const std::vector<int64_t>& ids, int64_t T,
               int64_t C, uintptr_t rows, uintptr_t counts) {
  auto* r = reinterpret_cast<int32_t*>(rows);
  auto* n = reinterpret_cast<int64_t*>(counts);
  if (elem_size == 1) {
    item_rows_of(reinterpret_cast<const uint8_t*>(weights), ids, T, C, r, n);
  } else if (elem_size == 4) {
    item_rows_of(reinterpret_cast<const int32_t*>(weights), ids, T, C, r, n);
  } else if (elem_size == 8) {
    item_rows_of(reinterpret_cast<const int64_t*>(weights), ids, T, C, r, n);
  } else {
    throw std::invalid_argument("weights must have 1, 4 or 8 bytes per element");
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
  m.def("item_rows", &item_rows, py::arg("weights"), py::arg("elem_size"), py::arg("ids"),
        py::arg("T"), py::arg("C"), py::arg("rows"), py::arg("counts"),
        "rows [B*T] int32 = ids[b] where weights [B, T] (1/4/8-byte ints, nonzero = counted) "
        "is set, else -1; counts [2, C] int64 += counted tokens and items per id in [0, C). "
        "Raw addresses of C-contiguous CPU tensors.");
}
