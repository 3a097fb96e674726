// The backward: every touched row's gradient, then the optimizer applied in place (see compose_kernel.h).
#include "compose_update.h"

namespace torchrec_qr_ops {
namespace {

// One read of a row by an id: its gradient is coef x grad (x other, the other part's row, for a two-part mult).
struct Read {
  int64_t row, part, id;
  float coef;
  const float* grad;
  const float* other;
  bool product;  // times the other parts' rows (per-id mult of three or more parts: read from the tables)
};

// What one read adds to its row's gradient: c g (concat, add, pooled mult's bag gradient) or c g times the
// other parts' rows (per-id mult). `first`: set instead of add.
inline void add_read(const Layout& L, const Read& r, int64_t D, bool first, float* __restrict__ acc, float* tmp) {
  const float* __restrict__ gr = r.grad;
  const float c = r.coef;
  if (r.other != nullptr) {
    mul_axpy_or_set(first, D, c, gr, r.other, acc);
    return;
  }
  if (!r.product) {
    axpy_or_set(first, D, c, gr, acc);
    return;
  }
  const int64_t s = L.slot_of[r.part];
  for (int64_t j = 0; j < D; ++j) {
    tmp[j] = c * gr[j];
  }
  for (int64_t q = L.first[s]; q < L.first[s] + L.count[s]; ++q) {
    if (q != r.part) {
      const float* row = L.row(q, r.id);
      for (int64_t j = 0; j < D; ++j) {
        tmp[j] *= row[j];
      }
    }
  }
  axpy_or_set(first, D, 1.0f, tmp, acc);
}

// Pooled mult, bag b: each part's bag gradient, g times the other parts' pooled rows, into out (k x D).
void pooled_bag_grads(const Layout& L, int64_t s, int64_t b, const float* g, float* pooled, float* out) {
  const int64_t p0 = L.first[s], k = L.count[s], D = L.dims[L.table[p0]];
  pool_parts(L, s, b, pooled);
  const float* gb = g + b * L.out_width + L.slot_col[s];
  for (int64_t q = 0; q < k; ++q) {
    float* o = out + q * D;
    std::copy(gb, gb + D, o);
    for (int64_t r = 0; r < k; ++r) {
      if (r != q) {
        for (int64_t j = 0; j < D; ++j) {
          o[j] *= pooled[r * D + j];
        }
      }
    }
  }
}

// Every read of slot s, in id order: the output gradient's row is read once for all the slot's parts.
void slot_grads(const Layout& L, int64_t s, const float* g, std::vector<TableGrad>& tables, float* tmp) {
  const int64_t p0 = L.first[s], k = L.count[s], slot_op = L.op[s], n = L.n[s];
  // Pooled mult: the bag gradients of the bag at hand.
  std::vector<float> pooled, bag_grad;
  if (slot_op == kPooledMult) {
    pooled.resize(k * L.dims[L.table[p0]]);
    bag_grad.resize(k * L.dims[L.table[p0]]);
  }
  for (int64_t b = 0; b < L.batch; ++b) {
    const float scale = L.scale(s, b);
    // A one-id bag of a pooled mult is the per-id product (its kernel is used in the forward too).
    const int64_t op = slot_op == kPooledMult && L.offsets[s][b + 1] - L.offsets[s][b] == 1 ? kMult : slot_op;
    const bool pair = op == kMult && k == 2;
    if (b + kPrefetch < L.batch) {
      const float* ahead = g + (b + kPrefetch) * L.out_width;
      for (int64_t p = p0; p < (op == kConcat ? p0 + k : p0 + 1); ++p) {
        prefetch_row(ahead + (op == kConcat ? L.col[p] : L.slot_col[s]), L.dims[L.table[p]]);
      }
    }
    if (op == kPooledMult) {
      pooled_bag_grads(L, s, b, g, pooled.data(), bag_grad.data());
    }
    for (int64_t i = L.offsets[s][b]; i < L.offsets[s][b + 1]; ++i) {
      if (i + 2 * kPrefetch < n) {
        for (int64_t p = p0; p < p0 + k; ++p) {
          tables[L.table[p]].index.prefetch_entry(L.idx[p][i + 2 * kPrefetch]);
        }
      }
      if (i + kPrefetch < n) {
        for (int64_t p = p0; p < p0 + k; ++p) {
          const int64_t t = L.table[p];
          prefetch_row(L.row(p, i + kPrefetch), L.dims[t]);
          tables[t].prefetch_slot(L.idx[p][i + kPrefetch], L.dims[t]);
        }
      }
      for (int64_t p = p0; p < p0 + k; ++p) {
        const int64_t t = L.table[p], D = L.dims[t];
        const float* w = (op != kPooledMult || p == p0) ? L.w[s] : nullptr;
        Read r{L.idx[p][i], p, i, (w ? w[i] : 1.0f) * scale, nullptr, nullptr, op == kMult};
        r.grad = op == kPooledMult ? bag_grad.data() + (p - p0) * D
                                   : g + b * L.out_width + (op == kConcat ? L.col[p] : L.slot_col[s]);
        if (pair) {
          r.other = L.row(p == p0 ? p0 + 1 : p0, i);
        }
        TableGrad& tg = tables[t];
        bool first;
        float* acc = tg.slot(r.row, D, first);
        add_read(L, r, D, first, acc, tmp);
      }
    }
  }
}

}  // namespace

void apply_update(const Layout& L, int64_t t, const TableGrad& tg, const TableOptimizer& opt) {
  const int64_t D = L.dims[t];
  const std::vector<int64_t>& rows = tg.index.rows;
  for (size_t u = 0; u < rows.size(); ++u) {
    if (u + kPrefetch < rows.size()) {
      opt.prefetch(rows[u + kPrefetch], D, L.tab[t]);
    }
    opt.update(rows[u], D, L.tab[t] + rows[u] * D, tg.grads.get() + u * D);
  }
}

void compose_backward_update(
    const at::Tensor& grad,
    at::TensorList tables,
    at::TensorList states,
    at::TensorList row_slots,
    at::TensorList indices,
    at::TensorList lengths,
    at::TensorList weights,
    at::TensorList pooled,
    at::IntArrayRef slots,
    at::IntArrayRef parts,
    at::IntArrayRef optimizers,
    at::ArrayRef<double> learning_rates,
    at::ArrayRef<double> eps,
    int64_t batch) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == batch,
              "compose backward: the output gradient must be a contiguous float32 [batch, width] matrix");
  Layout L = make_layout(tables, indices, lengths, weights, slots, parts, batch, grad.size(1));
  TORCH_CHECK(static_cast<int64_t>(pooled.size()) == L.num_slots, "compose backward: one pooled tensor per slot");
  for (int64_t s = 0; s < L.num_slots; ++s) {
    if (pooled[s].numel() > 0) {
      TORCH_CHECK(pooled[s].scalar_type() == at::kFloat && pooled[s].is_contiguous() && L.count[s] == 2 &&
                      pooled[s].numel() == batch * 2 * L.width[s],
                  "slot ", s, ": pooled parts must be the forward's contiguous float32 [batch, 2 x width]");
      L.pooled[s] = pooled[s].data_ptr<float>();
    }
  }
  const int64_t T = static_cast<int64_t>(tables.size());
  TORCH_CHECK(static_cast<int64_t>(states.size()) == T && static_cast<int64_t>(row_slots.size()) == T &&
                  static_cast<int64_t>(optimizers.size()) == T &&
                  static_cast<int64_t>(learning_rates.size()) == T && static_cast<int64_t>(eps.size()) == T,
              "compose backward: one optimizer, state, learning rate and eps per table");
  for (int64_t t = 0; t < T; ++t) {
    const int64_t expected = optimizers[t] == kSgd ? 0 : (optimizers[t] == kRowwiseAdagrad ? L.rows[t] : L.rows[t] * L.dims[t]);
    TORCH_CHECK(optimizers[t] >= kSgd && optimizers[t] <= kAdagrad, "table ", t, ": unknown optimizer");
    TORCH_CHECK(row_slots[t].scalar_type() == at::kInt && row_slots[t].is_contiguous() &&
                    row_slots[t].numel() == L.rows[t], "table ", t, ": its row -> slot map must be int32, one per row");
    TORCH_CHECK(states[t].numel() == expected && (expected == 0 || (states[t].scalar_type() == at::kFloat &&
                states[t].is_contiguous())), "table ", t, ": optimizer state of the wrong size or type");
  }
  const float* g = grad.data_ptr<float>();
  const int64_t max_dim = T ? *std::max_element(L.dims.begin(), L.dims.end()) : 1;
  // Slots that share a table are summed by one thread: union the tables each slot reads.
  std::vector<int64_t> root(T);
  for (int64_t t = 0; t < T; ++t) {
    root[t] = t;
  }
  auto find = [&](int64_t t) {
    while (root[t] != t) {
      t = root[t] = root[root[t]];
    }
    return t;
  };
  std::vector<int64_t> reads(T, 0);
  for (int64_t p = 0; p < L.num_parts; ++p) {
    reads[L.table[p]] += L.n[L.slot_of[p]];
    root[find(L.table[p])] = find(L.table[L.first[L.slot_of[p]]]);
  }
  std::vector<std::vector<int64_t>> groups(T);
  for (int64_t s = 0; s < L.num_slots; ++s) {
    groups[find(L.table[L.first[s]])].push_back(s);
  }
  std::vector<TableOptimizer> opts(T);
  std::vector<int32_t*> maps(T);
  for (int64_t t = 0; t < T; ++t) {
    opts[t] = {optimizers[t], static_cast<float>(learning_rates[t]), static_cast<float>(eps[t]),
               states[t].numel() ? states[t].data_ptr<float>() : nullptr};
    maps[t] = row_slots[t].data_ptr<int32_t>();
  }
  std::vector<TableGrad> table_grads(T);
  // Per group: every gradient first (mult gradients read the other parts' pre-update rows), then the updates,
  // while the rows just read are still in cache; no other group reads these tables. Groups of two-part slots
  // fold the two into one pass over the primary part's rows.
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(max_dim);
    for (int64_t c = begin; c < end; ++c) {
      if (groups[c].empty()) {
        continue;
      }
      const std::vector<int64_t> primaries = fold_primaries(L, groups[c]);
      if (!primaries.empty()) {
        folded_backward(L, groups[c], primaries, g, maps, reads, opts, max_dim);
        continue;
      }
      std::vector<int64_t> group_tables;
      for (int64_t s : groups[c]) {
        for (int64_t p = L.first[s]; p < L.first[s] + L.count[s]; ++p) {
          const int64_t t = L.table[p];
          if (!table_grads[t].grads) {
            table_grads[t].init(maps[t], L.rows[t], reads[t], L.dims[t]);
            group_tables.push_back(t);
          }
        }
        slot_grads(L, s, g, table_grads, tmp.data());
      }
      for (int64_t t : group_tables) {
        apply_update(L, t, table_grads[t], opts[t]);
        table_grads[t].release();
      }
    }
  });
}

}  // namespace torchrec_qr_ops
