// The folded backward of two-part slots (see compose_update.h).
#include "compose_update.h"

#include <algorithm>
#include <limits>

namespace torchrec_qr_ops {
namespace {

// One id of a folded slot with what its two gradients need; a table's ids are sorted by primary row.
struct Listed {
  const float* grad;   // its bag's output gradient (concat: the primary part's columns; pooled mult: the
                       // primary part's bag gradient)
  const float* other;  // mult: its secondary row; concat: the secondary part's output-gradient columns
  float* secondary;    // its secondary row's gradient (pooled mult: none, added per bag before this pass)
  float coef;          // its weight times MEAN's 1 / length
};

// Each primary row once: its gradient and (from its pre-update values, for mult) its ids' secondary gradients,
// then its update. Its ids are listed[begin[u], begin[u + 1]). Ahead (distances measured): ids' output
// gradients, then rows and their optimizer state.
template <int64_t kOp>
void update_primaries(const Layout& L, int64_t t, int64_t secondary_dim, const RowIndex& index,
                      const std::vector<int32_t>& begin, const std::vector<Listed>& listed, const TableOptimizer& opt,
                      float* acc) {
  const int64_t D = L.dims[t];
  const std::vector<int64_t>& rows = index.rows;
  const int32_t end = begin.back();
  for (size_t u = 0; u < rows.size(); ++u) {
    if (u + 2 * kPrefetch < rows.size()) {
      opt.prefetch(rows[u + 2 * kPrefetch], D, L.tab[t]);
    }
    float* wr = L.tab[t] + rows[u] * D;
    for (int32_t r = begin[u]; r < begin[u + 1]; ++r) {
      if (r + 2 * kPrefetch < end) {
        prefetch_row(listed[r + 2 * kPrefetch].grad, D);
      }
      const Listed& e = listed[r];
      const bool first = r == begin[u];
      if constexpr (kOp == kMult) {
        mul_axpy_or_set(first, D, e.coef, e.grad, e.other, acc);
        mul_axpy_or_set(false, D, e.coef, e.grad, wr, e.secondary);
      } else if constexpr (kOp == kAdd) {
        axpy_or_set(first, D, e.coef, e.grad, acc);
        axpy(D, e.coef, e.grad, e.secondary);
      } else if constexpr (kOp == kPooledMult) {
        axpy_or_set(first, D, e.coef, e.grad, acc);
      } else {
        axpy_or_set(first, D, e.coef, e.grad, acc);
        axpy(secondary_dim, e.coef, e.other, e.secondary);
      }
    }
    opt.update(rows[u], D, wr, acc);
  }
}

// A two-part pooled product's bag gradients: the output gradient times the other part's pooled vector (the
// forward's), times MEAN's 1 / length. The primary part's are returned (batch x D) for the pass over its rows;
// the secondary part's are added at once to the gradient of each of the bag's secondary rows (the smaller
// table's: cache-resident), so the pass over the primary rows reads one bag gradient per id, as a plain
// table's backward does.
std::unique_ptr<float[]> pair_pooled_grads(const Layout& L, int64_t s, int64_t primary, const float* g,
                                           TableGrad& secondary_grads) {
  const int64_t D = L.width[s], p0 = L.first[s], q = primary == p0 ? p0 + 1 : p0;
  const int64_t primary_col = primary == p0 ? 0 : D, secondary_col = D - primary_col;
  std::unique_ptr<float[]> out(new float[L.batch * D]);  // every element written below
  std::vector<float> bag_secondary(D);
  for (int64_t b = 0; b < L.batch; ++b) {
    if (b + kPrefetch < L.batch) {  // the output gradient's rows lie a page apart: no hardware prefetch
      prefetch_row(g + (b + kPrefetch) * L.out_width + L.slot_col[s], D);
      prefetch_row(L.pooled[s] + (b + kPrefetch) * 2 * D, 2 * D);
    }
    const float scale = L.scale(s, b);
    const float* gb = g + b * L.out_width + L.slot_col[s];
    const float* pooled = L.pooled[s] + b * 2 * D;
    float* o = out.get() + b * D;
    // The primary's gradient is the other (secondary) part's pool times the output gradient, and vice versa.
    for (int64_t j = 0; j < D; ++j) {
      o[j] = scale * gb[j] * pooled[secondary_col + j];
      bag_secondary[j] = scale * gb[j] * pooled[primary_col + j];
    }
    for (int64_t i = L.offsets[s][b]; i < L.offsets[s][b + 1]; ++i) {
      bool first;
      float* secondary = secondary_grads.slot(L.idx[q][i], D, first);
      axpy_or_set(first, D, 1.0f, bag_secondary.data(), secondary);
    }
  }
  return out;
}

}  // namespace

std::vector<int64_t> fold_primaries(const Layout& L, const std::vector<int64_t>& group) {
  enum Role : int8_t { kNone, kPrimary, kSecondary };
  std::vector<int8_t> role(L.tab.size(), kNone);
  std::vector<int64_t> primaries;
  for (int64_t s : group) {
    const int64_t p = L.first[s];
    if (L.count[s] != 2) {
      return {};
    }
    const int64_t primary = L.rows[L.table[p + 1]] > L.rows[L.table[p]] ? p + 1 : p;
    // Pooled products fold from the forward's pooled parts; their per-id weights scale the first part only,
    // which must then be the primary (one coefficient per id).
    if (L.per_id[s] == kPooledMult && (L.pooled[s] == nullptr || (L.w[s] != nullptr && primary != p))) {
      return {};
    }
    const int64_t tp = L.table[primary], ts = L.table[primary == p ? p + 1 : p];
    if (tp == ts || role[tp] == kSecondary || role[ts] == kPrimary) {
      return {};
    }
    // One combine and one pair of row widths per group: the pass over the primary rows is specialized to them.
    if (!primaries.empty()) {
      const int64_t s0 = group[0], t0 = L.table[primaries[0]];
      const int64_t u0 = L.table[primaries[0] == L.first[s0] ? L.first[s0] + 1 : L.first[s0]];
      if (L.per_id[s] != L.per_id[s0] || L.dims[tp] != L.dims[t0] || L.dims[ts] != L.dims[u0]) {
        return {};
      }
    }
    role[tp] = kPrimary;
    role[ts] = kSecondary;
    primaries.push_back(primary);
  }
  return primaries;
}

void folded_backward(const Layout& L, const std::vector<int64_t>& group, const std::vector<int64_t>& primaries,
                     const float* g, const std::vector<int32_t*>& row_slots, const std::vector<int64_t>& reads,
                     const std::vector<TableOptimizer>& opts, int64_t max_dim) {
  const int64_t T = static_cast<int64_t>(L.tab.size()), op = L.per_id[group[0]];
  auto secondary_of = [&](size_t k) {
    return primaries[k] == L.first[group[k]] ? primaries[k] + 1 : L.first[group[k]];
  };
  std::vector<RowIndex> index(T);
  std::vector<std::vector<int32_t>> begin(T);  // per primary row: where its ids start in listed
  std::vector<TableGrad> grads(T);
  std::vector<int64_t> primary_tables, secondary_tables;
  int64_t total = 0;
  for (size_t k = 0; k < group.size(); ++k) {
    total += L.n[group[k]];
    const int64_t tp = L.table[primaries[k]], ts = L.table[secondary_of(k)];
    if (index[tp].index_of_row == nullptr) {
      index[tp].index_of_row = row_slots[tp];
      index[tp].rows.reserve(std::min(reads[tp], L.rows[tp]));
      primary_tables.push_back(tp);
    }
    if (!grads[ts].grads) {
      grads[ts].init(row_slots[ts], L.rows[ts], reads[ts], L.dims[ts]);
      secondary_tables.push_back(ts);
    }
  }
  TORCH_CHECK(total < std::numeric_limits<int32_t>::max(), "compose backward: too many ids in one batch");
  // Every id's primary row, and the ids per row.
  std::vector<int32_t> row_of(total);
  int64_t j = 0;
  for (size_t k = 0; k < group.size(); ++k) {
    const int64_t s = group[k], p = primaries[k], n = L.n[s], tp = L.table[p];
    RowIndex& rows = index[tp];
    std::vector<int32_t>& count = begin[tp];
    for (int64_t i = 0; i < n; ++i, ++j) {
      if (i + 2 * kPrefetch < n) {
        rows.prefetch_entry(L.idx[p][i + 2 * kPrefetch]);
      }
      bool first;
      row_of[j] = rows.find_or_add(L.idx[p][i], first);
      if (first) {
        count.push_back(0);
      }
      ++count[row_of[j]];
    }
  }
  // Counts -> starts (each table's ids after the previous table's), then every id into its row's place;
  // secondary gradients start at zero.
  int32_t at = 0;
  for (int64_t t : primary_tables) {
    for (int32_t& c : begin[t]) {
      const int32_t count = c;
      c = at;
      at += count;
    }
    begin[t].push_back(at);
  }
  std::vector<std::vector<int32_t>> cursor(T);
  for (int64_t t : primary_tables) {
    cursor[t].assign(begin[t].begin(), begin[t].end() - 1);
  }
  std::vector<Listed> listed(total);
  std::vector<std::unique_ptr<float[]>> bag_grads(group.size());
  j = 0;
  for (size_t k = 0; k < group.size(); ++k) {
    const int64_t s = group[k], p = primaries[k], q = secondary_of(k);
    const int64_t tp = L.table[p], tq = L.table[q], Dq = L.dims[tq];
    if (op == kPooledMult) {
      // The MEAN scale is in the bag gradients; the per-id weights scale the primary part.
      bag_grads[k] = pair_pooled_grads(L, s, p, g, grads[tq]);
      for (int64_t b = 0; b < L.batch; ++b) {
        const float* gb = bag_grads[k].get() + b * Dq;
        for (int64_t i = L.offsets[s][b]; i < L.offsets[s][b + 1]; ++i, ++j) {
          listed[cursor[tp][row_of[j]]++] = {gb, nullptr, nullptr, L.w[s] ? L.w[s][i] : 1.0f};
        }
      }
      continue;
    }
    const int64_t grad_col = op == kConcat ? L.col[p] : L.slot_col[s], other_col = L.col[q];
    for (int64_t b = 0; b < L.batch; ++b) {
      const float scale = L.scale(s, b);
      const float* gb = g + b * L.out_width;
      for (int64_t i = L.offsets[s][b]; i < L.offsets[s][b + 1]; ++i, ++j) {
        bool first;
        float* secondary = grads[tq].slot(L.idx[q][i], Dq, first);
        if (first) {
          std::fill(secondary, secondary + Dq, 0.0f);
        }
        const float* other = op == kMult ? L.row(q, i) : (op == kAdd ? nullptr : gb + other_col);
        listed[cursor[tp][row_of[j]]++] = {gb + grad_col, other, secondary, (L.w[s] ? L.w[s][i] : 1.0f) * scale};
      }
    }
  }
  std::vector<float> acc(max_dim);
  const int64_t secondary_dim = L.dims[L.table[secondary_of(0)]];
  for (int64_t t : primary_tables) {
    if (op == kMult) {
      update_primaries<kMult>(L, t, secondary_dim, index[t], begin[t], listed, opts[t], acc.data());
    } else if (op == kAdd) {
      update_primaries<kAdd>(L, t, secondary_dim, index[t], begin[t], listed, opts[t], acc.data());
    } else if (op == kPooledMult) {
      update_primaries<kPooledMult>(L, t, secondary_dim, index[t], begin[t], listed, opts[t], acc.data());
    } else {
      update_primaries<kConcat>(L, t, secondary_dim, index[t], begin[t], listed, opts[t], acc.data());
    }
    index[t].release();
  }
  for (int64_t t : secondary_tables) {
    apply_update(L, t, grads[t], opts[t]);
    grads[t].release();
  }
}

}  // namespace torchrec_qr_ops
