// culture_neurons._C: exact, multi-threaded top-k and order statistics over plain buffers.
//
// The Python face (culture_neurons/topk.py) holds the real docstrings, validates inputs and
// has a pure-PyTorch twin with the same contract. This file sees only C-contiguous numpy
// arrays of float32 / float64 (no torch headers, so the extension builds in seconds).
//
// Contract (identical in the PyTorch twin):
//   ranking order  : larger value first; among equal values the smaller flat index first
//                    (-0.0 == +0.0 are equal; -inf and +inf are ordinary values)
//   NaN            : never selected by top-k; left out of order statistics (k counts only
//                    the non-NaN values, k > their number is an error)
//   top-k output   : int64 indices, sorted by the ranking order; min(k, #non-NaN) of them
//   k-th value     : the k-th smallest non-NaN value, 1-based (torch.kthvalue semantics)
//
// Algorithms, all linear time in the input (no full sort of the input):
//   top-k   each thread scans its slice keeping a candidate buffer of at most 2k items; when
//           full, nth_element keeps the best k and their worst value becomes the bar a new
//           item must beat (strictly: an equal value comes later, so has a larger index).
//           The per-thread candidates are merged with one more nth_element, and only the k
//           winners are sorted.
//   k-th    a strided sample brackets the answer between two sample values lo <= hi; one
//           parallel pass counts values below lo and inside [lo, hi], a second gathers the
//           inside ones and nth_element picks the answer. If the bracket misses (adversarial
//           data) the exact fallback nth_elements all non-NaN values.
// Sizes and indices are int64 throughout, so arrays past 2^31 elements work.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinPerThread = 1 << 18;
// Sample size for bracketing an order statistic (bucket ~ 8 / sqrt(sample) of the input).
constexpr int64_t kSampleSize = 1 << 16;

template <typename T>
struct Item {
  T value;
  int64_t index;
};

// The ranking order: larger value first, then the smaller index.
template <typename T>
inline bool ranks_before(const Item<T>& a, const Item<T>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

int resolve_threads(int requested, int64_t n) {
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  int threads = requested > 0 ? requested : std::max(hw, 1);
  int64_t useful = std::max<int64_t>(n / kMinPerThread, 1);
  return static_cast<int>(std::min<int64_t>(threads, useful));
}

// Run fn(t) for t in [0, threads) on `threads` threads (the calling thread is one of them).
// An exception in any of them (e.g. std::bad_alloc) is rethrown here after all have joined,
// instead of terminating the process.
template <typename Fn>
void parallel_for(int threads, Fn fn) {
  std::vector<std::exception_ptr> errors(std::max(threads, 1));
  auto guarded = [&](int t) {
    try {
      fn(t);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads > 0 ? threads - 1 : 0);
  for (int t = 1; t < threads; ++t) pool.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Slice t of `threads` equal slices of [0, n).
inline std::pair<int64_t, int64_t> slice(int64_t n, int threads, int t) {
  return {n * t / threads, n * (t + 1) / threads};
}

// Keep the best k of buf (by ranks_before), unsorted.
template <typename T>
void keep_best(std::vector<Item<T>>& buf, int64_t k) {
  if (static_cast<int64_t>(buf.size()) <= k) return;
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), ranks_before<T>);
  buf.resize(k);
}

// The best k non-NaN items of v[begin, end), unsorted; fewer if there are fewer non-NaN.
template <typename T>
std::vector<Item<T>> slice_topk(const T* v, int64_t begin, int64_t end, int64_t k) {
  std::vector<Item<T>> buf;
  if (k <= 0 || end <= begin) return buf;
  const int64_t cap = std::min<int64_t>(std::max<int64_t>(2 * k, k + 1024), end - begin);
  buf.reserve(cap);
  bool full = false;
  T bar = -std::numeric_limits<T>::infinity();
  for (int64_t i = begin; i < end; ++i) {
    const T x = v[i];
    // One comparison on the hot path: once the buffer has been cut to k, only a value above
    // the worst kept one can enter (an equal one has a larger index, so ranks below it).
    // Before that every non-NaN value enters (-inf included: x != x is true only for NaN).
    if (!(x > bar) && (full || x != x)) continue;
    buf.push_back({x, i});
    if (static_cast<int64_t>(buf.size()) == cap && cap > k) {
      keep_best(buf, k);
      bar = buf[k - 1].value;  // nth_element put the k-th best at position k - 1
      full = true;
    }
  }
  keep_best(buf, k);
  return buf;
}

// Indices of the top k of v[0, n), sorted by the ranking order.
template <typename T>
std::vector<int64_t> topk_1d(const T* v, int64_t n, int64_t k, int threads) {
  std::vector<int64_t> out;
  if (k <= 0 || n <= 0) return out;
  k = std::min(k, n);
  threads = resolve_threads(threads, n);
  std::vector<std::vector<Item<T>>> parts(threads);
  parallel_for(threads, [&](int t) {
    auto [begin, end] = slice(n, threads, t);
    parts[t] = slice_topk(v, begin, end, k);
  });
  std::vector<Item<T>> merged = std::move(parts[0]);
  for (int t = 1; t < threads; ++t) merged.insert(merged.end(), parts[t].begin(), parts[t].end());
  keep_best(merged, k);
  std::sort(merged.begin(), merged.end(), ranks_before<T>);
  out.reserve(merged.size());
  for (const auto& it : merged) out.push_back(it.index);
  return out;
}

// Per-row top k of a C-contiguous [rows, n] array. Many rows: one thread per row at a time;
// few rows: each row uses all threads.
template <typename T>
std::vector<std::vector<int64_t>> topk_rows_impl(const T* v, int64_t rows, int64_t n, int64_t k,
                                                 int threads) {
  std::vector<std::vector<int64_t>> out(rows);
  int pool = resolve_threads(threads, rows * n);
  if (rows >= pool) {
    std::atomic<int64_t> next{0};
    parallel_for(pool, [&](int) {
      for (int64_t r = next++; r < rows; r = next++) out[r] = topk_1d(v + r * n, n, k, 1);
    });
  } else {
    for (int64_t r = 0; r < rows; ++r) out[r] = topk_1d(v + r * n, n, k, threads);
  }
  return out;
}

// Per-group top k: group g's candidates are the non-NaN values[i] with groups[i] == g
// (groups[i] < 0: in no group). A stable counting sort by group puts each group's items in
// index order in one buffer; each group is then selected in place (in parallel over groups).
template <typename T>
std::vector<std::vector<int64_t>> topk_groups_impl(const T* v, const int64_t* groups, int64_t n,
                                                   int64_t num_groups, int64_t k, int threads) {
  std::vector<std::vector<int64_t>> out(num_groups);
  std::vector<int64_t> start(num_groups + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (groups[i] >= 0 && !std::isnan(v[i])) ++start[groups[i] + 1];
  for (int64_t g = 0; g < num_groups; ++g) start[g + 1] += start[g];
  std::vector<Item<T>> items(start[num_groups]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    if (groups[i] >= 0 && !std::isnan(v[i])) items[fill[groups[i]]++] = {v[i], i};
  if (k <= 0) return out;

  std::atomic<int64_t> next{0};
  int pool = resolve_threads(threads, start[num_groups]);
  parallel_for(pool, [&](int) {
    for (int64_t g = next++; g < num_groups; g = next++) {
      auto begin = items.begin() + start[g], end = items.begin() + start[g + 1];
      const int64_t take = std::min<int64_t>(k, end - begin);
      if (take == 0) continue;
      std::nth_element(begin, begin + (take - 1), end, ranks_before<T>);
      std::sort(begin, begin + take, ranks_before<T>);
      out[g].reserve(take);
      for (auto it = begin; it != begin + take; ++it) out[g].push_back(it->index);
    }
  });
  return out;
}

// Largest value of each column of a C-contiguous [R, J] array, its row (the first on ties:
// only a strictly larger value takes over) and the second largest, counting multiplicity.
// NaN never takes over a column, except in row 0 where it seeds `first` (callers pass NaN-free
// data; the PyTorch twin behaves the same way). Columns are cut into cache-sized blocks.
template <typename T>
void top2_impl(const T* v, int64_t R, int64_t J, T* first, int64_t* arg, T* second,
               int threads) {
  constexpr int64_t kBlock = 2048;
  threads = resolve_threads(threads, R * J);
  parallel_for(threads, [&](int t) {
    auto [b, e] = slice(J, threads, t);
    for (int64_t j0 = b; j0 < e; j0 += kBlock) {
      const int64_t j1 = std::min(e, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j) {
        first[j] = v[j];
        arg[j] = 0;
        second[j] = -std::numeric_limits<T>::infinity();
      }
      for (int64_t r = 1; r < R; ++r) {
        const T* row = v + r * J;
        for (int64_t j = j0; j < j1; ++j) {
          const T x = row[j];
          if (x > first[j]) {
            second[j] = first[j];
            first[j] = x;
            arg[j] = r;
          } else if (x > second[j]) {
            second[j] = x;
          }
        }
      }
    }
  });
}

// ---- order statistic ------------------------------------------------------------------------

[[noreturn]] void bad_rank(int64_t k, int64_t valid, int64_t n) {
  throw std::invalid_argument("k=" + std::to_string(k) + " is out of range: the array has " +
                              std::to_string(valid) + " non-NaN values (of " + std::to_string(n) +
                              "); k must be in [1, " + std::to_string(valid) + "]");
}

// Exact and simple: copy the non-NaN values, nth_element. O(n) time and memory.
template <typename T>
double kth_exact(const T* v, int64_t n, int64_t k) {
  std::vector<T> vals;
  vals.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(v[i])) vals.push_back(v[i]);
  const int64_t valid = static_cast<int64_t>(vals.size());
  if (k < 1 || k > valid) bad_rank(k, valid, n);
  std::nth_element(vals.begin(), vals.begin() + (k - 1), vals.end());
  return static_cast<double>(vals[k - 1]);
}

template <typename T>
double kth_value_impl(const T* v, int64_t n, int64_t k, int threads) {
  threads = resolve_threads(threads, n);
  if (threads == 1 || n < 4 * kSampleSize) return kth_exact(v, n, k);

  // 1. Strided sample of the non-NaN values; where k falls in it, plus a margin of ~8 standard
  //    deviations of a sample rank, gives the bracket [lo, hi].
  std::vector<T> sample;
  const int64_t stride = n / kSampleSize;
  for (int64_t i = 0; i < n; i += stride)
    if (!std::isnan(v[i])) sample.push_back(v[i]);
  const int64_t sampled = (n + stride - 1) / stride;
  const int64_t s = static_cast<int64_t>(sample.size());
  if (s < 1024) return kth_exact(v, n, k);  // mostly NaN: nothing to gain
  std::sort(sample.begin(), sample.end());
  const double valid_est = static_cast<double>(n) * s / sampled;
  const int64_t guess = static_cast<int64_t>((k - 0.5) / valid_est * s);
  const int64_t pos = std::clamp<int64_t>(guess, 0, s - 1);
  const int64_t margin = 4 * static_cast<int64_t>(std::sqrt(static_cast<double>(s))) + 16;
  const T inf = std::numeric_limits<T>::infinity();
  const T lo = pos - margin < 0 ? -inf : sample[pos - margin];
  const T hi = pos + margin >= s ? inf : sample[pos + margin];

  // 2. One parallel pass: NaN count, values below lo, values inside [lo, hi].
  std::vector<int64_t> nan_c(threads), below_c(threads), inside_c(threads);
  parallel_for(threads, [&](int t) {
    auto [begin, end] = slice(n, threads, t);
    int64_t nan = 0, below = 0, inside = 0;
    for (int64_t i = begin; i < end; ++i) {
      const T x = v[i];
      nan += x != x;
      below += x < lo;
      inside += (x >= lo) & (x <= hi);
    }
    nan_c[t] = nan, below_c[t] = below, inside_c[t] = inside;
  });
  int64_t nan = 0, below = 0, inside = 0;
  for (int t = 0; t < threads; ++t) nan += nan_c[t], below += below_c[t], inside += inside_c[t];
  const int64_t valid = n - nan;
  if (k < 1 || k > valid) bad_rank(k, valid, n);
  if (k <= below || k > below + inside) return kth_exact(v, n, k);  // bracket missed
  if (lo == hi) return static_cast<double>(lo);

  // 3. Gather the bracket (per thread, then concatenated) and select inside it.
  std::vector<std::vector<T>> parts(threads);
  parallel_for(threads, [&](int t) {
    auto [begin, end] = slice(n, threads, t);
    parts[t].reserve(inside_c[t]);
    for (int64_t i = begin; i < end; ++i)
      if (v[i] >= lo && v[i] <= hi) parts[t].push_back(v[i]);
  });
  std::vector<T> bucket;
  bucket.reserve(inside);
  for (auto& p : parts) bucket.insert(bucket.end(), p.begin(), p.end());
  const int64_t r = k - below - 1;
  std::nth_element(bucket.begin(), bucket.begin() + r, bucket.end());
  return static_cast<double>(bucket[r]);
}

// ---- bindings -------------------------------------------------------------------------------

py::array_t<int64_t> to_numpy(const std::vector<int64_t>& v) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

template <typename T>
py::array_t<T, py::array::c_style> as_contiguous(const py::array& a) {
  return py::array_t<T, py::array::c_style>::ensure(a);
}

bool is_float32(const py::array& a) { return a.dtype().is(py::dtype::of<float>()); }
bool is_float64(const py::array& a) { return a.dtype().is(py::dtype::of<double>()); }

void check_float(const py::array& a) {
  if (!is_float32(a) && !is_float64(a))
    throw py::type_error("values must be float32 or float64, got dtype " +
                         std::string(py::str(a.dtype())));
}

void check_k(int64_t k) {
  if (k < 0) throw std::invalid_argument("k must be >= 0, got " + std::to_string(k));
}

// Rows of results as CSR: (indptr [R + 1], index [nnz]).
py::tuple csr(const std::vector<std::vector<int64_t>>& res) {
  const int64_t rows = static_cast<int64_t>(res.size());
  std::vector<int64_t> indptr(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) indptr[r + 1] = indptr[r] + res[r].size();
  py::array_t<int64_t> index(static_cast<py::ssize_t>(indptr[rows]));
  int64_t* dst = index.mutable_data();
  for (int64_t r = 0; r < rows; ++r) std::copy(res[r].begin(), res[r].end(), dst + indptr[r]);
  return py::make_tuple(to_numpy(indptr), index);
}

py::tuple topk_groups(const py::array& values, const py::array& groups, int64_t num_groups,
                      int64_t k, int threads) {
  check_float(values);
  check_k(k);
  if (!groups.dtype().is(py::dtype::of<int64_t>()))
    throw py::type_error("groups must be int64, got dtype " + std::string(py::str(groups.dtype())));
  if (groups.size() != values.size())
    throw std::invalid_argument("groups has " + std::to_string(groups.size()) +
                                " entries, values " + std::to_string(values.size()));
  if (num_groups < 0) throw std::invalid_argument("num_groups must be >= 0");
  auto g = py::array_t<int64_t, py::array::c_style>::ensure(groups);
  const int64_t n = values.size();
  const int64_t* gp = g.data();
  for (int64_t i = 0; i < n; ++i)
    if (gp[i] >= num_groups)
      throw std::invalid_argument("group id " + std::to_string(gp[i]) + " at " +
                                  std::to_string(i) + " is not below num_groups=" +
                                  std::to_string(num_groups));
  std::vector<std::vector<int64_t>> res;
  auto run = [&](auto arr) {
    const auto* ptr = arr.data();
    py::gil_scoped_release release;
    res = topk_groups_impl(ptr, gp, n, num_groups, k, threads);
  };
  if (is_float32(values))
    run(as_contiguous<float>(values));
  else
    run(as_contiguous<double>(values));
  return csr(res);
}

py::tuple top2(const py::array& values, int threads) {
  check_float(values);
  if (values.ndim() != 2 || values.shape(0) < 1)
    throw std::invalid_argument("top2 expects a 2-D [R, J] array with R >= 1");
  const int64_t R = values.shape(0), J = values.shape(1);
  py::array arg_out = py::array_t<int64_t>(J);
  auto run = [&](auto arr) -> py::tuple {
    using T = typename std::remove_const_t<std::remove_pointer_t<decltype(arr.data())>>;
    py::array_t<T> first(J), second(J);
    const T* ptr = arr.data();
    T *f = first.mutable_data(), *s = second.mutable_data();
    auto* a = static_cast<int64_t*>(arg_out.mutable_data());
    {
      py::gil_scoped_release release;
      top2_impl(ptr, R, J, f, a, s, threads);
    }
    return py::make_tuple(first, arg_out, second);
  };
  if (is_float32(values)) return run(as_contiguous<float>(values));
  return run(as_contiguous<double>(values));
}

py::tuple topk_rows(const py::array& values, int64_t k, int threads) {
  check_float(values);
  check_k(k);
  if (values.ndim() != 2)
    throw std::invalid_argument("topk_rows expects a 2-D array, got " +
                                std::to_string(values.ndim()) + "-D");
  const int64_t rows = values.shape(0), n = values.shape(1);
  std::vector<std::vector<int64_t>> res;
  auto run = [&](auto arr) {
    const auto* ptr = arr.data();
    py::gil_scoped_release release;
    res = topk_rows_impl(ptr, rows, n, k, threads);
  };
  if (is_float32(values))
    run(as_contiguous<float>(values));
  else
    run(as_contiguous<double>(values));
  return csr(res);
}

py::array_t<int64_t> topk(const py::array& values, int64_t k, int threads) {
  check_float(values);
  check_k(k);
  const int64_t n = values.size();
  std::vector<int64_t> res;
  auto run = [&](auto arr) {
    const auto* ptr = arr.data();
    py::gil_scoped_release release;
    res = topk_1d(ptr, n, k, threads);
  };
  if (is_float32(values))
    run(as_contiguous<float>(values));
  else
    run(as_contiguous<double>(values));
  return to_numpy(res);
}

double kth_value(const py::array& values, int64_t k, int threads) {
  check_float(values);
  const int64_t n = values.size();
  double out = 0;
  auto run = [&](auto arr) {
    const auto* ptr = arr.data();
    py::gil_scoped_release release;
    out = kth_value_impl(ptr, n, k, threads);
  };
  if (is_float32(values))
    run(as_contiguous<float>(values));
  else
    run(as_contiguous<double>(values));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Exact multi-threaded top-k / k-th value; see culture_neurons.topk for the contract.";
  m.def("topk", &topk, py::arg("values"), py::arg("k"), py::arg("threads") = 0,
        "Indices (int64) of the k largest non-NaN values of a flattened float32/float64 array, "
        "sorted by (value desc, index asc). threads=0: all cores.");
  m.def("topk_rows", &topk_rows, py::arg("values"), py::arg("k"), py::arg("threads") = 0,
        "Per-row top k of a [R, n] array as CSR (indptr [R+1], index [nnz]), same order.");
  m.def("topk_groups", &topk_groups, py::arg("values"), py::arg("groups"), py::arg("num_groups"),
        py::arg("k"), py::arg("threads") = 0,
        "Per-group top k of a flat array (groups int64, < 0 = no group) as CSR over groups of "
        "flat indices, same order.");
  m.def("top2", &top2, py::arg("values"), py::arg("threads") = 0,
        "(first, argmax, second) of each column of a NaN-free [R, J] array; argmax is the "
        "first row on ties, second counts multiplicity.");
  m.def("kth_value", &kth_value, py::arg("values"), py::arg("k"), py::arg("threads") = 0,
        "The k-th smallest non-NaN value (1-based, NaN left out); ValueError if k is not in "
        "[1, number of non-NaN].");
}
