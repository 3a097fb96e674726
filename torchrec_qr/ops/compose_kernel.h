// Fused lookup + composition + pooling for compositional embedding bags on CPU, and its backward with the
// optimizer applied in place (as FBGEMM's fused TBE backward does).
//
// A *slot* is one pooled output (a feature of a logical table, or a column shard of one): its bags (lengths),
// optional per-id weights, and its *parts*, one per sub-table: the ids' rows in one table, either given or
// computed here as (id // divisor) % modulus. The forward reads each id's sub-table rows, combines them
// (concat, add, per-id mult, or pooled mult: each part pooled, then multiplied), pools per bag (SUM or MEAN)
// and writes the result straight into its output columns: no per-id rows are materialized. The backward
// works per group of slots sharing tables and applies SGD, row-wise Adagrad or Adagrad with FBGEMM's update
// rules to the tables and their optimizer state. Groups of two-part slots fold (compose_update.h): ids sorted
// by their larger part's row, each such row read once for both parts' gradients and updated at once. Other
// groups read each output-gradient row once per slot, sum every touched row's gradient (from it and, for
// mult, the other parts' pre-update rows) into a slot per row, then update.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace torchrec_qr_ops {

enum Op : int64_t { kConcat = 0, kAdd = 1, kMult = 2, kPooledMult = 3 };
enum Optimizer : int64_t { kSgd = 0, kRowwiseAdagrad = 1, kAdagrad = 2 };

constexpr int64_t kSlotFields = 5;  // op, mean, first part, number of parts, output column
constexpr int64_t kPartFields = 4;  // table, output column, divisor, modulus (0: none)

struct Layout {
  int64_t batch = 0;
  int64_t out_width = 0;
  int64_t num_slots = 0;
  int64_t num_parts = 0;
  std::vector<int64_t> op, mean, first, count, slot_col, n;  // per slot
  std::vector<int64_t> width;                                // per slot: output columns
  std::vector<int64_t> per_id;  // per slot: its op, but kMult for a pooled mult of bags of at most one id
  std::vector<std::vector<int64_t>> offsets;                 // per slot, batch + 1
  std::vector<const float*> w;                               // per slot, null when unweighted
  std::vector<const float*> pooled;  // per slot: each bag's pooled parts (backward, two-part pooled mult) or null
  std::vector<int64_t> table, col, slot_of;                  // per part
  std::vector<const int64_t*> idx;                           // per part: its rows
  std::vector<at::Tensor> rows_of_part;                      // per part: its rows (given, or computed here)
  std::vector<float*> tab;                                   // per table
  std::vector<int64_t> rows, dims;                           // per table

  float scale(int64_t s, int64_t b) const {
    const int64_t len = offsets[s][b + 1] - offsets[s][b];
    return (mean[s] && len > 0) ? 1.0f / static_cast<float>(len) : 1.0f;
  }
  const float* row(int64_t p, int64_t i) const {
    const int64_t t = table[p];
    return tab[t] + idx[p][i] * dims[t];
  }
};

// The layout of one call: slots, parts, bags and the tables; ids of div/mod parts turned into rows.
Layout make_layout(at::TensorList tables, at::TensorList indices, at::TensorList lengths, at::TensorList weights,
                   at::IntArrayRef slots, at::IntArrayRef parts, int64_t batch, int64_t out_width);

// Every row read is inside its table (a clear error instead of a wild read when ids are not validated).
void check_bounds(const Layout& L);

// Pools each part of slot s over bag b into tmp (count x D, each factor scaled for MEAN); the first part
// takes the per-id weights (pooled-mode mult, as the kernel-pooled path applies them).
void pool_parts(const Layout& L, int64_t s, int64_t b, float* tmp);

// Rows are read in id order, scattered over tables larger than the caches: each loop prefetches the rows
// kPrefetch ids ahead, as FBGEMM's lookup kernels do.
constexpr int64_t kPrefetch = 8;

// An asm statement: GCC 12 drops __builtin_prefetch of addresses computed from loaded indices.
inline void prefetch_row(const float* row, int64_t d) {
#if defined(__x86_64__)
  for (int64_t j = 0; j < d; j += 16) {
    asm volatile("prefetcht0 %0" : : "m"(row[j]));
  }
#else
  for (int64_t j = 0; j < d; j += 16) {
    __builtin_prefetch(row + j, 0, 3);
  }
#endif
}

// 16 floats (registers): sums kept in these across a loop are not stored and reloaded per step.
typedef float Floats16 __attribute__((vector_size(64)));
typedef float Floats8 __attribute__((vector_size(32)));

inline Floats16 load16(const float* p) {
  Floats16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float sum_of_lanes(Floats16 v) {
  Floats8 lo, hi;
  __builtin_memcpy(&lo, &v, sizeof(lo));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const Floats8 s = lo + hi;
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

inline void axpy(int64_t d, float a, const float* __restrict__ x, float* __restrict__ y) {
  for (int64_t j = 0; j < d; ++j) {
    y[j] += a * x[j];
  }
}

// y = a x for a bag's first id, y += a x after: the output row is never zero-filled and re-read (a wide
// zero store forwards badly to the narrower loads that follow, stalling on the row's cache miss).
inline void axpy_or_set(bool first, int64_t d, float a, const float* __restrict__ x, float* __restrict__ y) {
  if (first) {
    for (int64_t j = 0; j < d; ++j) {
      y[j] = a * x[j];
    }
  } else {
    axpy(d, a, x, y);
  }
}

// y = a x z for a first term, y += a x z after (a product's gradient: the output gradient times the other row).
inline void mul_axpy_or_set(bool first, int64_t d, float a, const float* __restrict__ x, const float* __restrict__ z,
                            float* __restrict__ y) {
  if (first) {
    for (int64_t j = 0; j < d; ++j) {
      y[j] = a * x[j] * z[j];
    }
  } else {
    for (int64_t j = 0; j < d; ++j) {
      y[j] += a * x[j] * z[j];
    }
  }
}

// y = a (x + z) for a first term, y += a (x + z) after.
inline void add_axpy_or_set(bool first, int64_t d, float a, const float* __restrict__ x, const float* __restrict__ z,
                            float* __restrict__ y) {
  if (first) {
    for (int64_t j = 0; j < d; ++j) {
      y[j] = a * (x[j] + z[j]);
    }
  } else {
    for (int64_t j = 0; j < d; ++j) {
      y[j] += a * (x[j] + z[j]);
    }
  }
}

inline void scale_by(int64_t d, float a, float* __restrict__ y) {
  if (a != 1.0f) {
    for (int64_t j = 0; j < d; ++j) {
      y[j] *= a;
    }
  }
}

// The output; each part's rows, which the backward takes as given rows (divisor 1, modulus 0) instead of
// computing the classes again; and per slot, for two-part pooled products of longer bags, each bag's pooled
// parts (batch x 2D; empty for other slots), from which the backward forms their bag gradients.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> compose_forward(
    at::TensorList tables, at::TensorList indices, at::TensorList lengths, at::TensorList weights,
    at::IntArrayRef slots, at::IntArrayRef parts, int64_t batch, int64_t out_width);

void compose_backward_update(const at::Tensor& grad, at::TensorList tables, at::TensorList states,
                             at::TensorList row_slots, at::TensorList indices, at::TensorList lengths,
                             at::TensorList weights, at::TensorList pooled, at::IntArrayRef slots, at::IntArrayRef parts,
                             at::IntArrayRef optimizers, at::ArrayRef<double> learning_rates,
                             at::ArrayRef<double> eps, int64_t batch);

}  // namespace torchrec_qr_ops
