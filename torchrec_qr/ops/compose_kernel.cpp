// Fused lookup + composition + pooling for compositional embedding bags on CPU, and its backward with the
// optimizer applied in place (as FBGEMM's fused TBE backward does).
//
// A *slot* is one pooled output (a feature of a logical table, or a column shard of one): its bags (lengths),
// optional per-id weights, and its *parts*, one per sub-table: the ids' rows in one table, either given or
// computed here as (id // divisor) % modulus. The forward reads each id's sub-table rows, combines them
// (concat, add, per-id mult, or pooled mult: each part pooled, then multiplied), pools per bag (SUM or MEAN)
// and writes the result straight into its output columns: no per-id rows are materialized. The backward
// reads each output-gradient row once per slot and sums every touched row's gradient (from it and, for mult,
// the other parts' pre-update rows) into a slot per row; then, per group of slots sharing tables, applies
// SGD, row-wise Adagrad or Adagrad with FBGEMM's update rules to the tables and their optimizer state.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace {

enum Op : int64_t { kConcat = 0, kAdd = 1, kMult = 2, kPooledMult = 3 };
enum Optimizer : int64_t { kSgd = 0, kRowwiseAdagrad = 1, kAdagrad = 2 };

constexpr int64_t kSlotFields = 5;  // op, mean, first part, number of parts, output column
constexpr int64_t kPartFields = 4;  // table, output column, divisor, modulus (0: none)

// Classes (id // divisor) % modulus of n ids, for 0 <= id < 2^52 by multiplying with the reciprocals and one
// correction step (exact there, and vectorizable; a 64-bit division per id costs more than reading its row);
// any other id by division.
void div_mod(const int64_t* ids, int64_t n, int64_t divisor, int64_t modulus, int64_t* out) {
  const double inv_d = 1.0 / static_cast<double>(divisor);
  const double inv_m = modulus ? 1.0 / static_cast<double>(modulus) : 0.0;
  bool exact = true;
  for (int64_t i = 0; i < n; ++i) {
    exact &= ids[i] >= 0 && ids[i] < (int64_t{1} << 52);
  }
  if (!exact) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = ids[i] / divisor;  // out-of-range ids (negative) are reported by the bounds check
      out[i] = modulus ? c % modulus : c;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    int64_t c = static_cast<int64_t>(static_cast<double>(ids[i]) * inv_d);
    const int64_t r = ids[i] - c * divisor;
    c += (r >= divisor) - (r < 0);
    if (modulus) {
      int64_t q = static_cast<int64_t>(static_cast<double>(c) * inv_m);
      const int64_t rm = c - q * modulus;
      q += (rm >= modulus) - (rm < 0);
      c -= q * modulus;
    }
    out[i] = c;
  }
}

struct Layout {
  int64_t batch = 0;
  int64_t out_width = 0;
  int64_t num_slots = 0;
  int64_t num_parts = 0;
  std::vector<int64_t> op, mean, first, count, slot_col, n;  // per slot
  std::vector<int64_t> width;                                // per slot: output columns
  std::vector<std::vector<int64_t>> offsets;                 // per slot, batch + 1
  std::vector<const float*> w;                               // per slot, null when unweighted
  std::vector<int64_t> table, col, slot_of;                  // per part
  std::vector<const int64_t*> idx;                           // per part: its rows
  std::vector<std::vector<int64_t>> classes;                 // per part: rows computed from ids here
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

template <typename T>
void fill_offsets(const at::Tensor& lengths, std::vector<int64_t>& out) {
  const T* len = lengths.data_ptr<T>();
  out.resize(lengths.numel() + 1);
  out[0] = 0;
  for (int64_t b = 0; b < lengths.numel(); ++b) {
    out[b + 1] = out[b] + static_cast<int64_t>(len[b]);
  }
}

Layout make_layout(
    at::TensorList tables,
    at::TensorList indices,
    at::TensorList lengths,
    at::TensorList weights,
    at::IntArrayRef slots,
    at::IntArrayRef parts,
    int64_t batch,
    int64_t out_width) {
  Layout L;
  L.batch = batch;
  L.out_width = out_width;
  TORCH_CHECK(slots.size() % kSlotFields == 0 && parts.size() % kPartFields == 0, "malformed compose layout");
  L.num_slots = static_cast<int64_t>(slots.size()) / kSlotFields;
  L.num_parts = static_cast<int64_t>(parts.size()) / kPartFields;
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == L.num_slots, "one lengths tensor per slot expected");
  TORCH_CHECK(static_cast<int64_t>(indices.size()) == L.num_parts, "one index tensor per part expected");
  TORCH_CHECK(weights.empty() || static_cast<int64_t>(weights.size()) == L.num_slots, "one weight tensor per slot");
  for (const auto& t : tables) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(),
                "compose kernel tables must be contiguous float32 CPU matrices");
    L.tab.push_back(t.data_ptr<float>());
    L.rows.push_back(t.size(0));
    L.dims.push_back(t.size(1));
  }
  L.slot_of.assign(L.num_parts, -1);
  for (int64_t s = 0; s < L.num_slots; ++s) {
    const int64_t* f = slots.data() + s * kSlotFields;
    L.op.push_back(f[0]);
    L.mean.push_back(f[1]);
    L.first.push_back(f[2]);
    L.count.push_back(f[3]);
    L.slot_col.push_back(f[4]);
    TORCH_CHECK(f[0] >= kConcat && f[0] <= kPooledMult && f[3] >= 1 && f[2] >= 0 && f[2] + f[3] <= L.num_parts,
                "malformed compose slot ", s);
    const at::Tensor& len = lengths[s];
    TORCH_CHECK(len.device().is_cpu() && len.is_contiguous() && len.numel() == batch, "slot ", s,
                ": lengths must be a contiguous CPU tensor of the batch size");
    L.offsets.emplace_back();
    if (len.scalar_type() == at::kInt) {
      fill_offsets<int32_t>(len, L.offsets.back());
    } else {
      TORCH_CHECK(len.scalar_type() == at::kLong, "slot ", s, ": lengths must be int32 or int64");
      fill_offsets<int64_t>(len, L.offsets.back());
    }
    L.n.push_back(L.offsets.back()[batch]);
    const float* w = nullptr;
    if (!weights.empty()) {
      const at::Tensor& wt = weights[s];
      TORCH_CHECK(wt.scalar_type() == at::kFloat && wt.is_contiguous() && wt.numel() == L.n[s], "slot ", s,
                  ": weights must be contiguous float32, one per id");
      w = wt.data_ptr<float>();
    }
    L.w.push_back(w);
    for (int64_t p = f[2]; p < f[2] + f[3]; ++p) {
      L.slot_of[p] = s;
    }
  }
  for (int64_t p = 0; p < L.num_parts; ++p) {
    const int64_t* f = parts.data() + p * kPartFields;
    const int64_t s = L.slot_of[p];
    TORCH_CHECK(s >= 0, "part ", p, " belongs to no slot");
    TORCH_CHECK(f[0] >= 0 && f[0] < static_cast<int64_t>(tables.size()), "part ", p, ": no table ", f[0]);
    L.table.push_back(f[0]);
    L.col.push_back(f[1]);
    TORCH_CHECK(f[1] >= 0 && f[1] + L.dims[f[0]] <= out_width, "part ", p, ": columns out of the output");
    const at::Tensor& ix = indices[p];
    TORCH_CHECK(ix.scalar_type() == at::kLong && ix.is_contiguous() && ix.numel() == L.n[s], "part ", p,
                ": indices must be contiguous int64, one per id of its slot");
    L.idx.push_back(ix.data_ptr<int64_t>());
    TORCH_CHECK(f[2] >= 1 && f[3] >= 0, "part ", p, ": divisor must be positive and modulus non-negative");
    if (L.op[s] != kConcat) {
      TORCH_CHECK(L.dims[f[0]] == L.dims[L.table[L.first[s]]], "slot ", s, ": parts combined by add/mult must have equal widths");
    }
  }
  for (int64_t s = 0; s < L.num_slots; ++s) {
    int64_t w = 0;
    for (int64_t p = L.first[s]; p < L.first[s] + L.count[s]; ++p) {
      TORCH_CHECK(L.op[s] != kConcat || L.col[p] == L.slot_col[s] + w, "slot ", s, ": concat parts must be adjacent");
      w = L.op[s] == kConcat ? w + L.dims[L.table[p]] : L.dims[L.table[p]];
    }
    L.width.push_back(w);
  }
  L.classes.resize(L.num_parts);
  at::parallel_for(0, L.num_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t* f = parts.data() + p * kPartFields;
      if (f[2] != 1 || f[3] != 0) {
        L.classes[p].resize(L.n[L.slot_of[p]]);
        div_mod(L.idx[p], L.n[L.slot_of[p]], f[2], f[3], L.classes[p].data());
      }
    }
  });
  for (int64_t p = 0; p < L.num_parts; ++p) {
    if (!L.classes[p].empty()) {
      L.idx[p] = L.classes[p].data();
    }
  }
  return L;
}

void check_bounds(const Layout& L) {
  at::parallel_for(0, L.num_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t rows = L.rows[L.table[p]];
      for (int64_t i = 0; i < L.n[L.slot_of[p]]; ++i) {
        TORCH_CHECK(L.idx[p][i] >= 0 && L.idx[p][i] < rows, "compose kernel: row ", L.idx[p][i],
                    " is out of range for table ", L.table[p], " of ", rows, " rows");
      }
    }
  });
}

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

inline void scale_by(int64_t d, float a, float* __restrict__ y) {
  if (a != 1.0f) {
    for (int64_t j = 0; j < d; ++j) {
      y[j] *= a;
    }
  }
}

// Pools each part of slot s over bag b into tmp (count x D, each factor scaled for MEAN); the first part
// takes the per-id weights (pooled-mode mult, as the kernel-pooled path applies them).
void pool_parts(const Layout& L, int64_t s, int64_t b, float* tmp) {
  const int64_t p0 = L.first[s], D = L.dims[L.table[p0]];
  const int64_t start = L.offsets[s][b], end = L.offsets[s][b + 1];
  for (int64_t k = 0; k < L.count[s]; ++k) {
    float* acc = tmp + k * D;
    std::fill(acc, acc + D, 0.0f);
    const float* w = k == 0 ? L.w[s] : nullptr;
    for (int64_t i = start; i < end; ++i) {
      axpy(D, w ? w[i] : 1.0f, L.row(p0 + k, i), acc);
    }
    scale_by(D, L.scale(s, b), acc);
  }
}

void prefetch_ids(const Layout& L, int64_t s, int64_t from, int64_t to) {
  const int64_t last = std::min(to, L.n[s]);
  for (int64_t i = from; i < last; ++i) {
    for (int64_t p = L.first[s]; p < L.first[s] + L.count[s]; ++p) {
      prefetch_row(L.row(p, i), L.dims[L.table[p]]);
    }
  }
}

// Writes a finished output row: streaming stores (no read of the destination line first) where aligned, as
// the output (batch x every feature's width) is far larger than the caches and written once.
inline void store_row(float* __restrict__ dst, const float* __restrict__ src, int64_t d) {
#if defined(__AVX__)
  if (reinterpret_cast<uintptr_t>(dst) % 32 == 0 && d % 8 == 0) {
    for (int64_t j = 0; j < d; j += 8) {
      _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
    }
    return;
  }
#endif
  std::copy(src, src + d, dst);
}

// Slot s of bag b into out_row (at the slot's columns); tmp holds the slot's width, then count x D floats.
void forward_bag(const Layout& L, int64_t s, int64_t b, float* out_row, float* tmp) {
  const int64_t start = L.offsets[s][b], end = L.offsets[s][b + 1];
  prefetch_ids(L, s, start + kPrefetch, end + kPrefetch);
  const float scale = L.scale(s, b);
  const float* w = L.w[s];
  const int64_t p0 = L.first[s], k = L.count[s];
  const int64_t D = L.dims[L.table[p0]];
  const int64_t width = L.width[s];
  // A one-id bag of a pooled mult is the per-id product.
  const int64_t op = L.op[s] == kPooledMult && end - start == 1 ? kMult : L.op[s];
  float* acc = tmp;
  float* scratch = tmp + width;
  if (start == end) {
    std::fill(acc, acc + width, 0.0f);
  } else if (op == kConcat) {
    for (int64_t p = p0; p < p0 + k; ++p) {
      const int64_t d = L.dims[L.table[p]];
      for (int64_t i = start; i < end; ++i) {
        axpy_or_set(i == start, d, (w ? w[i] : 1.0f) * scale, L.row(p, i), acc + L.col[p] - L.slot_col[s]);
      }
    }
  } else if (op == kPooledMult) {
    pool_parts(L, s, b, scratch);
    std::copy(scratch, scratch + D, acc);
    for (int64_t q = 1; q < k; ++q) {
      const float* f = scratch + q * D;
      for (int64_t j = 0; j < D; ++j) {
        acc[j] *= f[j];
      }
    }
  } else {
    for (int64_t i = start; i < end; ++i) {
      const float c = (w ? w[i] : 1.0f) * scale;
      const bool first = i == start;
      if (op == kAdd) {
        for (int64_t p = p0; p < p0 + k; ++p) {
          axpy_or_set(first && p == p0, D, c, L.row(p, i), acc);
        }
      } else if (k == 2) {
        const float* __restrict__ r0 = L.row(p0, i);
        const float* __restrict__ r1 = L.row(p0 + 1, i);
        float* __restrict__ o = acc;
        if (first) {
          for (int64_t j = 0; j < D; ++j) {
            o[j] = c * r0[j] * r1[j];
          }
        } else {
          for (int64_t j = 0; j < D; ++j) {
            o[j] += c * r0[j] * r1[j];
          }
        }
      } else {
        const float* r0 = L.row(p0, i);
        for (int64_t j = 0; j < D; ++j) {
          scratch[j] = c * r0[j];
        }
        for (int64_t p = p0 + 1; p < p0 + k; ++p) {
          const float* r = L.row(p, i);
          for (int64_t j = 0; j < D; ++j) {
            scratch[j] *= r[j];
          }
        }
        axpy_or_set(first, D, 1.0f, scratch, acc);
      }
    }
  }
  store_row(out_row + L.slot_col[s], acc, width);
}

int64_t tmp_size(const Layout& L) {
  int64_t size = 1;
  for (int64_t s = 0; s < L.num_slots; ++s) {
    size = std::max(size, L.width[s] + L.count[s] * L.dims[L.table[L.first[s]]]);
  }
  return size;
}

at::Tensor compose_forward(
    at::TensorList tables,
    at::TensorList indices,
    at::TensorList lengths,
    at::TensorList weights,
    at::IntArrayRef slots,
    at::IntArrayRef parts,
    int64_t batch,
    int64_t out_width) {
  const Layout L = make_layout(tables, indices, lengths, weights, slots, parts, batch, out_width);
  check_bounds(L);
  // Every column is written: the slots tile the output.
  at::Tensor out = at::empty({batch, out_width}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t size = tmp_size(L);
  at::parallel_for(0, L.num_slots * batch, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(size);
    for (int64_t sb = begin; sb < end; ++sb) {
      const int64_t s = sb / batch, b = sb % batch;
      forward_bag(L, s, b, o + b * out_width, tmp.data());
    }
#if defined(__AVX__)
    _mm_sfence();  // the streaming stores are visible before the output is
#endif
  });
  return out;
}

// One read of a row by an id: its gradient is coef x grad (x other, the other part's row, for a two-part mult).
struct Read {
  int64_t row, part, id;
  float coef;
  const float* grad;
  const float* other;
  bool product;  // times the other parts' rows (per-id mult of three or more parts: read from the tables)
};

// The rows of one table a batch touched and the gradient of each, summed into a slot per distinct row found
// through the table's row -> slot map (a caller-owned int32 per row, -1 between batches: only touched entries
// are reset, so a batch costs its reads, not the table's rows).
struct TableGrad {
  std::vector<int64_t> rows;
  std::unique_ptr<float[]> grads;  // rows.size() x D, each row written (not added) first
  int32_t* slot_of_row = nullptr;

  void init(int32_t* row_slots, int64_t num_rows, int64_t reads_expected, int64_t d) {
    slot_of_row = row_slots;
    const int64_t capacity = std::max<int64_t>(std::min(reads_expected, num_rows), 1);
    rows.reserve(capacity);
    grads.reset(new float[capacity * d]);
  }
  // A row read soon: its map entry (far ahead), then its gradient slot if it has one (nearer).
  void prefetch_entry(int64_t row) const {
    prefetch_row(reinterpret_cast<const float*>(slot_of_row + row), 1);
  }
  void prefetch_slot(int64_t row, int64_t d) const {
    if (slot_of_row[row] >= 0) {
      prefetch_row(grads.get() + static_cast<int64_t>(slot_of_row[row]) * d, d);
    }
  }
  // The row's gradient slot, and whether this is its first read.
  float* slot(int64_t row, int64_t d, bool& first) {
    int32_t at = slot_of_row[row];
    first = at < 0;
    if (first) {
      at = static_cast<int32_t>(rows.size());
      slot_of_row[row] = at;
      rows.push_back(row);
    }
    return grads.get() + static_cast<int64_t>(at) * d;
  }
  void release() {
    for (int64_t row : rows) {
      slot_of_row[row] = -1;
    }
  }
};

// What one read adds to its row's gradient: c g (concat, add, pooled mult's bag gradient) or c g times the
// other parts' rows (per-id mult). `first`: set instead of add.
inline void add_read(const Layout& L, const Read& r, int64_t D, bool first, float* __restrict__ acc, float* tmp) {
  const float* __restrict__ gr = r.grad;
  const float c = r.coef;
  if (r.other != nullptr) {
    const float* __restrict__ other = r.other;
    if (first) {
      for (int64_t j = 0; j < D; ++j) {
        acc[j] = c * gr[j] * other[j];
      }
    } else {
      for (int64_t j = 0; j < D; ++j) {
        acc[j] += c * gr[j] * other[j];
      }
    }
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
          tables[L.table[p]].prefetch_entry(L.idx[p][i + 2 * kPrefetch]);
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

void apply_update(const Layout& L, int64_t t, const TableGrad& tg, int64_t optimizer, float lr, float eps,
                  float* state) {
  const int64_t D = L.dims[t];
  float* weights = L.tab[t];
  for (size_t u = 0; u < tg.rows.size(); ++u) {
    if (u + kPrefetch < tg.rows.size()) {
      prefetch_row(weights + tg.rows[u + kPrefetch] * D, D);
      if (state != nullptr) {
        prefetch_row(state + tg.rows[u + kPrefetch] * (optimizer == kAdagrad ? D : 1), 1);
      }
    }
    const int64_t row = tg.rows[u];
    const float* gr = tg.grads.get() + u * D;
    float* wr = weights + row * D;
    if (optimizer == kSgd) {
      for (int64_t j = 0; j < D; ++j) {
        wr[j] -= lr * gr[j];
      }
    } else if (optimizer == kRowwiseAdagrad) {
      float sum_square = 0.0f;
      for (int64_t j = 0; j < D; ++j) {
        sum_square += gr[j] * gr[j];
      }
      const float momentum = state[row] + sum_square / static_cast<float>(D);
      state[row] = momentum;
      const float multiplier = lr / (std::sqrt(momentum) + eps);
      for (int64_t j = 0; j < D; ++j) {
        wr[j] -= multiplier * gr[j];
      }
    } else {
      float* m = state + row * D;
      for (int64_t j = 0; j < D; ++j) {
        m[j] += gr[j] * gr[j];
        wr[j] -= lr * gr[j] / (std::sqrt(m[j]) + eps);
      }
    }
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
    at::IntArrayRef slots,
    at::IntArrayRef parts,
    at::IntArrayRef optimizers,
    at::ArrayRef<double> learning_rates,
    at::ArrayRef<double> eps,
    int64_t batch) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == batch,
              "compose backward: the output gradient must be a contiguous float32 [batch, width] matrix");
  const Layout L = make_layout(tables, indices, lengths, weights, slots, parts, batch, grad.size(1));
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
  std::vector<TableGrad> table_grads(T);
  // Per group: every gradient first (mult gradients read the other parts' pre-update rows), then the updates,
  // while the rows just read are still in cache; no other group reads these tables.
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(max_dim);
    for (int64_t c = begin; c < end; ++c) {
      std::vector<int64_t> group_tables;
      for (int64_t s : groups[c]) {
        for (int64_t p = L.first[s]; p < L.first[s] + L.count[s]; ++p) {
          const int64_t t = L.table[p];
          if (!table_grads[t].grads) {
            table_grads[t].init(row_slots[t].data_ptr<int32_t>(), L.rows[t], reads[t], L.dims[t]);
            group_tables.push_back(t);
          }
        }
        slot_grads(L, s, g, table_grads, tmp.data());
      }
      for (int64_t t : group_tables) {
        float* state = states[t].numel() ? states[t].data_ptr<float>() : nullptr;
        apply_update(L, t, table_grads[t], optimizers[t], static_cast<float>(learning_rates[t]),
                     static_cast<float>(eps[t]), state);
        table_grads[t].release();
        table_grads[t].grads.reset();
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(torchrec_qr, m) {
  m.def(
      "compose_forward(Tensor[] tables, Tensor[] indices, Tensor[] lengths, Tensor[] weights, int[] slots, "
      "int[] parts, int batch, int out_width) -> Tensor");
  m.def(
      "compose_backward_update(Tensor grad, Tensor(a!)[] tables, Tensor(b!)[] states, Tensor(c!)[] row_slots, "
      "Tensor[] indices, "
      "Tensor[] lengths, Tensor[] weights, int[] slots, int[] parts, int[] optimizers, float[] learning_rates, "
      "float[] eps, int batch) -> ()");
}

TORCH_LIBRARY_IMPL(torchrec_qr, CPU, m) {
  m.impl("compose_forward", &compose_forward);
  m.impl("compose_backward_update", &compose_backward_update);
}
