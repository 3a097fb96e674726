// The forward: lookup, composition and pooling into the output (see compose_kernel.h).
#include "compose_kernel.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace torchrec_qr_ops {
namespace {

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

// Slot s of bag b into out_row (at the slot's columns), for slots of one or of three or more parts (two-part
// slots take forward_pair); tmp holds the slot's width, then count x D floats.
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

// A table of at most this many bytes stays in cache between its reads.
constexpr int64_t kCacheResident = 256 * 1024;

// The rows of id i + 2 kPrefetch (of n) in the parts whose tables do not stay in cache (measured: prefetching
// cache-resident rows costs, not saves).
inline void prefetch_pair(int64_t i, int64_t n, const float* tp, const int64_t* ip, int64_t dp, bool ahead_p,
                          const float* tq, const int64_t* iq, int64_t dq, bool ahead_q) {
  if (i + 2 * kPrefetch < n) {
    if (ahead_p) {
      prefetch_row(tp + ip[i + 2 * kPrefetch] * dp, dp);
    }
    if (ahead_q) {
      prefetch_row(tq + iq[i + 2 * kPrefetch] * dq, dq);
    }
  }
}

// One bag of a two-part per-id mult or add, or pooled mult (its two pooled parts also written to `pool`), of
// width kD (a multiple of 16) into o.
template <int64_t kOp, int64_t kD>
inline void pair_bag_in_registers(int64_t start, int64_t end, int64_t n, float scale, const float* w,
                                  const float* tp, const int64_t* ip, bool ahead_p, const float* tq,
                                  const int64_t* iq, bool ahead_q, float* o, float* pool) {
  constexpr int64_t kV = kD / 16;  // a bag's sum lives in kV registers across its ids, not in the output row
  Floats16 acc[kV] = {};
  Floats16 acc_q[kOp == kPooledMult ? kV : 1] = {};  // pooled mult: the second part's pool
  for (int64_t i = start; i < end; ++i) {
    prefetch_pair(i, n, tp, ip, kD, ahead_p, tq, iq, kD, ahead_q);
    const float c = (w ? w[i] : 1.0f) * scale;
    const float* rp = tp + ip[i] * kD;
    const float* rq = tq + iq[i] * kD;
    for (int64_t v = 0; v < kV; ++v) {
      if constexpr (kOp == kMult) {
        acc[v] += c * load16(rp + 16 * v) * load16(rq + 16 * v);
      } else if constexpr (kOp == kAdd) {
        acc[v] += c * (load16(rp + 16 * v) + load16(rq + 16 * v));
      } else {
        acc[v] += c * load16(rp + 16 * v);  // the per-id weights scale the first part
        acc_q[v] += scale * load16(rq + 16 * v);
      }
    }
  }
  if constexpr (kOp == kPooledMult) {
    store_row(pool, reinterpret_cast<const float*>(acc), kD);
    store_row(pool + kD, reinterpret_cast<const float*>(acc_q), kD);
    for (int64_t v = 0; v < kV; ++v) {
      acc[v] *= acc_q[v];
    }
  }
  store_row(o, reinterpret_cast<const float*>(acc), kD);
}

// Bags [b0, b1) of a two-part slot (the common compositional table) combined per id, or pooled per part and
// multiplied (the pooled parts kept in `pooled`, batch x 2D, for the backward): the slot's constants hoisted
// out of the bag loop, each bag summed in L1 and its output row written once with streaming stores (measured:
// read-for-ownership misses on the output rows otherwise stall the loop, up to 2x its time).
template <int64_t kOp>
void forward_pair(const Layout& L, int64_t s, int64_t b0, int64_t b1, float* out, float* pooled) {
  const int64_t p = L.first[s], q = p + 1, n = L.n[s];
  const int64_t Dp = L.dims[L.table[p]], Dq = L.dims[L.table[q]], width = L.width[s];
  const float* __restrict__ tp = L.tab[L.table[p]];
  const float* __restrict__ tq = L.tab[L.table[q]];
  const int64_t* ip = L.idx[p];
  const int64_t* iq = L.idx[q];
  const int64_t* offsets = L.offsets[s].data();
  const float* w = L.w[s];
  const bool ahead_p = L.rows[L.table[p]] * Dp * 4 > kCacheResident;
  const bool ahead_q = L.rows[L.table[q]] * Dq * 4 > kCacheResident;
  // Pooled parts are summed in L1 and streamed out once per bag (read back only in the backward).
  std::vector<float> pool_buffer(kOp == kPooledMult ? 2 * Dp : 0);
  float* __restrict__ pool = pool_buffer.data();
  std::vector<float> row_buffer(width);
  float* __restrict__ o = row_buffer.data();
  for (int64_t b = b0; b < b1; ++b) {
    float* out_row = out + b * L.out_width + L.slot_col[s];
    const int64_t start = offsets[b], end = offsets[b + 1];
    if (start == end) {
      std::fill(o, o + width, 0.0f);
      store_row(out_row, o, width);
      if constexpr (kOp == kPooledMult) {
        std::fill(pool, pool + 2 * Dp, 0.0f);
        store_row(pooled + b * 2 * Dp, pool, 2 * Dp);
      }
      continue;
    }
    const float scale = L.mean[s] ? 1.0f / static_cast<float>(end - start) : 1.0f;
    if constexpr (kOp != kConcat) {
      if (Dp == 16 || Dp == 32 || Dp == 64 || Dp == 128) {
        auto bag = Dp == 16   ? pair_bag_in_registers<kOp, 16>
                   : Dp == 32 ? pair_bag_in_registers<kOp, 32>
                   : Dp == 64 ? pair_bag_in_registers<kOp, 64>
                              : pair_bag_in_registers<kOp, 128>;
        bag(start, end, n, scale, w, tp, ip, ahead_p, tq, iq, ahead_q, out_row,
            kOp == kPooledMult ? pooled + b * 2 * Dp : nullptr);
        continue;
      }
    }
    for (int64_t i = start; i < end; ++i) {
      prefetch_pair(i, n, tp, ip, Dp, ahead_p, tq, iq, Dq, ahead_q);
      const float c = (w ? w[i] : 1.0f) * scale;
      const float* __restrict__ rp = tp + ip[i] * Dp;
      const float* __restrict__ rq = tq + iq[i] * Dq;
      const bool first = i == start;
      if constexpr (kOp == kMult) {
        mul_axpy_or_set(first, Dp, c, rp, rq, o);
      } else if constexpr (kOp == kAdd) {
        add_axpy_or_set(first, Dp, c, rp, rq, o);
      } else if constexpr (kOp == kPooledMult) {
        axpy_or_set(first, Dp, c, rp, pool);  // the per-id weights scale the first part
        axpy_or_set(first, Dp, scale, rq, pool + Dp);
      } else {
        axpy_or_set(first, Dp, c, rp, o);
        axpy_or_set(first, Dq, c, rq, o + Dp);
      }
    }
    if constexpr (kOp == kPooledMult) {
      for (int64_t j = 0; j < Dp; ++j) {
        o[j] = pool[j] * pool[Dp + j];
      }
      store_row(pooled + b * 2 * Dp, pool, 2 * Dp);
    }
    store_row(out_row, o, width);
  }
}

int64_t tmp_size(const Layout& L) {
  int64_t size = 1;
  for (int64_t s = 0; s < L.num_slots; ++s) {
    size = std::max(size, L.width[s] + L.count[s] * L.dims[L.table[L.first[s]]]);
  }
  return size;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> compose_forward(
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
  // Two-part pooled products keep each bag's pooled parts for the backward (compose_update.h).
  std::vector<at::Tensor> pooled(L.num_slots);
  for (int64_t s = 0; s < L.num_slots; ++s) {
    const bool keep = L.per_id[s] == kPooledMult && L.count[s] == 2;
    pooled[s] = at::empty({keep ? batch : 0, keep ? 2 * L.width[s] : 0}, at::TensorOptions().dtype(at::kFloat));
  }
  at::parallel_for(0, L.num_slots * batch, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(size);
    for (int64_t sb = begin; sb < end;) {
      const int64_t s = sb / batch, b0 = sb % batch, b1 = std::min(batch, b0 + end - sb);
      sb += b1 - b0;
      const int64_t op = L.per_id[s];
      float* pool = pooled[s].numel() ? pooled[s].data_ptr<float>() : nullptr;
      if (L.count[s] == 2 && op == kMult) {
        forward_pair<kMult>(L, s, b0, b1, o, pool);
      } else if (L.count[s] == 2 && op == kAdd) {
        forward_pair<kAdd>(L, s, b0, b1, o, pool);
      } else if (L.count[s] == 2 && op == kConcat) {
        forward_pair<kConcat>(L, s, b0, b1, o, pool);
      } else if (pool != nullptr) {
        forward_pair<kPooledMult>(L, s, b0, b1, o, pool);
      } else {
        for (int64_t b = b0; b < b1; ++b) {
          forward_bag(L, s, b, o + b * out_width, tmp.data());
        }
      }
    }
#if defined(__AVX__)
    _mm_sfence();  // the streaming stores are visible before the output is
#endif
  });
  return {out, L.rows_of_part, pooled};
}

}  // namespace torchrec_qr_ops
