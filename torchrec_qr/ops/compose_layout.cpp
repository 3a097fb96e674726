// The layout of a compose call (see compose_kernel.h) and the op registration.
#include "compose_kernel.h"

#include <torch/library.h>

namespace torchrec_qr_ops {
namespace {

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

template <typename T>
void fill_offsets(const at::Tensor& lengths, std::vector<int64_t>& out) {
  const T* len = lengths.data_ptr<T>();
  out.resize(lengths.numel() + 1);
  out[0] = 0;
  for (int64_t b = 0; b < lengths.numel(); ++b) {
    out[b + 1] = out[b] + static_cast<int64_t>(len[b]);
  }
}

}  // namespace

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
    bool one_id_bags = L.op[s] == kPooledMult;  // only a pooled mult's bags matter here
    for (int64_t b = 0; b < batch && one_id_bags; ++b) {
      one_id_bags = L.offsets[s][b + 1] - L.offsets[s][b] <= 1;
    }
    L.per_id.push_back(one_id_bags ? kMult : L.op[s]);
  }
  L.pooled.assign(L.num_slots, nullptr);
  L.rows_of_part.assign(indices.begin(), indices.end());
  at::parallel_for(0, L.num_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t* f = parts.data() + p * kPartFields;
      if (f[2] != 1 || f[3] != 0) {
        at::Tensor rows = at::empty({L.n[L.slot_of[p]]}, at::TensorOptions().dtype(at::kLong));
        div_mod(L.idx[p], L.n[L.slot_of[p]], f[2], f[3], rows.data_ptr<int64_t>());
        L.rows_of_part[p] = rows;
      }
    }
  });
  for (int64_t p = 0; p < L.num_parts; ++p) {
    L.idx[p] = L.rows_of_part[p].data_ptr<int64_t>();
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

}  // namespace torchrec_qr_ops

TORCH_LIBRARY(torchrec_qr, m) {
  m.def(
      "compose_forward(Tensor[] tables, Tensor[] indices, Tensor[] lengths, Tensor[] weights, int[] slots, "
      "int[] parts, int batch, int out_width) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "compose_backward_update(Tensor grad, Tensor(a!)[] tables, Tensor(b!)[] states, Tensor(c!)[] row_slots, "
      "Tensor[] indices, "
      "Tensor[] lengths, Tensor[] weights, Tensor[] pooled, int[] slots, int[] parts, int[] optimizers, "
      "float[] learning_rates, "
      "float[] eps, int batch) -> ()");
}

TORCH_LIBRARY_IMPL(torchrec_qr, CPU, m) {
  m.impl("compose_forward", &torchrec_qr_ops::compose_forward);
  m.impl("compose_backward_update", &torchrec_qr_ops::compose_backward_update);
}

