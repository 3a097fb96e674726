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

}  // namespace

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

}  // namespace torchrec_qr_ops
