// The backward's building blocks (see compose_kernel.h): the distinct rows a batch touched, their gradients,
// the optimizer step of one row, and the folded pass of two-part slots.
#pragma once

#include "compose_kernel.h"

#include <cmath>
#include <memory>

namespace torchrec_qr_ops {

// The distinct rows of one table a batch touched, in first-touch order, found through the table's row -> index
// map (a caller-owned int32 per row, -1 between batches: only touched entries are reset, so a batch costs its
// reads, not the table's rows). The entries are reset on every exit, a failed backward's too (destructor).
struct RowIndex {
  std::vector<int64_t> rows;
  int32_t* index_of_row = nullptr;

  RowIndex() = default;
  RowIndex(const RowIndex&) = delete;
  RowIndex& operator=(const RowIndex&) = delete;
  ~RowIndex() {
    release();
  }
  void prefetch_entry(int64_t row) const {
    prefetch_row(reinterpret_cast<const float*>(index_of_row + row), 1);
  }
  // The row's index, -1 when it has none yet.
  int32_t find(int64_t row) const {
    return index_of_row[row];
  }
  int32_t find_or_add(int64_t row, bool& first) {
    int32_t at = find(row);
    first = at < 0;
    if (first) {
      at = static_cast<int32_t>(rows.size());
      index_of_row[row] = at;
      rows.push_back(row);
    }
    return at;
  }
  void release() {
    for (int64_t row : rows) {
      index_of_row[row] = -1;
    }
    rows.clear();
  }
};

// The touched rows of one table and the gradient of each (rows.size() x D, each row written, not added, first).
struct TableGrad {
  RowIndex index;
  std::unique_ptr<float[]> grads;

  void init(int32_t* row_slots, int64_t num_rows, int64_t reads_expected, int64_t d) {
    index.index_of_row = row_slots;
    const int64_t capacity = std::max<int64_t>(std::min(reads_expected, num_rows), 1);
    index.rows.reserve(capacity);
    grads.reset(new float[capacity * d]);
  }
  void prefetch_slot(int64_t row, int64_t d) const {
    const int32_t at = index.find(row);
    if (at >= 0) {
      prefetch_row(grads.get() + static_cast<int64_t>(at) * d, d);
    }
  }
  // The row's gradient, and whether this is its first read.
  float* slot(int64_t row, int64_t d, bool& first) {
    return grads.get() + static_cast<int64_t>(index.find_or_add(row, first)) * d;
  }
  void release() {
    index.release();
    grads.reset();
  }
};

// Sixteen running sums, then their sum: one running sum makes every add wait for the previous one (the compiler
// may not reorder float adds), which had cost more than the rest of the row-wise update.
inline float sum_of_squares(int64_t d, const float* __restrict__ x) {
  Floats16 lanes = {};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const Floats16 v = load16(x + j);
    lanes += v * v;
  }
  float rest = 0.0f;
  for (; j < d; ++j) {
    rest += x[j] * x[j];
  }
  return sum_of_lanes(lanes) + rest;
}

// One table's optimizer: FBGEMM's update rules over its own state (none for SGD, one float per row for
// row-wise Adagrad, one per element for Adagrad).
struct TableOptimizer {
  int64_t kind = kSgd;
  float lr = 0.0f, eps = 0.0f;
  float* state = nullptr;

  void prefetch(int64_t row, int64_t d, const float* weights) const {
    prefetch_row(weights + row * d, d);
    if (state != nullptr) {
      prefetch_row(state + row * (kind == kAdagrad ? d : 1), 1);
    }
  }
  void update(int64_t row, int64_t d, float* __restrict__ wr, const float* __restrict__ gr) const {
    if (kind == kSgd) {
      for (int64_t j = 0; j < d; ++j) {
        wr[j] -= lr * gr[j];
      }
    } else if (kind == kRowwiseAdagrad) {
      const float momentum = state[row] + sum_of_squares(d, gr) / static_cast<float>(d);
      state[row] = momentum;
      const float multiplier = lr / (std::sqrt(momentum) + eps);
      for (int64_t j = 0; j < d; ++j) {
        wr[j] -= multiplier * gr[j];
      }
    } else {
      float* m = state + row * d;
      for (int64_t j = 0; j < d; ++j) {
        m[j] += gr[j] * gr[j];
        wr[j] -= lr * gr[j] / (std::sqrt(m[j]) + eps);
      }
    }
  }
};

// Applies table t's optimizer to every row in tg with its gradient.
void apply_update(const Layout& L, int64_t t, const TableGrad& tg, const TableOptimizer& opt);

// The primary part of each slot of a group whose slots all have two parts combined one way (per id: concat, add,
// mult; or pooled mult, from the forward's pools) and whose primary (larger) and secondary tables are disjoint;
// empty when the group does not fold.
std::vector<int64_t> fold_primaries(const Layout& L, const std::vector<int64_t>& group);

// The folded backward of such a group: the ids are sorted by primary row (a counting sort), then each primary
// row is read once for its own gradient (from the secondary rows) and its ids' secondary gradients (from it),
// and updated at once (pooled mult: each bag's secondary gradient is added to its secondary rows in a pass over
// the bags before); the secondary tables are updated after. A plain table's backward reads each row once:
// so does this for the primary part, where the unfolded pass reads it twice (once more for the other part's
// gradient) and sums gradients per row through a scattered buffer. row_slots: each table's row -> index map;
// reads: each table's reads in this batch (a capacity hint).
void folded_backward(const Layout& L, const std::vector<int64_t>& group, const std::vector<int64_t>& primaries,
                     const float* g, const std::vector<int32_t*>& row_slots, const std::vector<int64_t>& reads,
                     const std::vector<TableOptimizer>& opts, int64_t max_dim);

}  // namespace torchrec_qr_ops
