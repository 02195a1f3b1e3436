// CPU kernels for the masked-token ops (MaskDiT / SD-DiT): row gather / scatter along the token axis.
//
//   gather_tokens(x (N,T,D), ids (N,K))                  -> out[n,k] = x[n, ids[n,k]]          (N,K,D)
//   _gather_tokens_backward(g (N,K,D), ids, T)           -> dx[n, ids[n,k]] = g[n,k], 0 elsewhere
//   scatter_tokens(kept (N,K,D), ids, fill, T)           -> out[n, ids[n,k]] = kept[n,k], fill elsewhere
//   _scatter_tokens_backward(g (N,T,D), ids, per_token, fill_dtype)
//        -> dkept[n,k] = g[n, ids[n,k]];  dfill = sum of g over removed rows (fill (D,), fp32 accumulation,
//           fixed-order partials: deterministic) or g * mask (fill (N,T,D)).
//
// fill is (D,) (broadcast mask token) or (N,T,D) (per-token; any row strides, unit inner stride) and has
// the dtype of kept or float32; the output takes kept's dtype.
//
// Every op that writes (N,T,D) rows first builds an (N,T) int32 inverse map (kept slot or -1) from ids,
// then writes each output row exactly once (plain stores, no atomics). Building the map validates ids for
// free on the CPU: an id outside [0, T) or a repeated id raises (the CUDA kernels cannot raise without a
// host sync, see tokens_kernel.cu).
//
// The input checks below are shared with the CUDA host functions (declared in tokens_kernel.cu).
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../common.h"

namespace dit_kernels_tokens {

void check_ids(const at::Tensor& ids, int64_t n, const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids_keep must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == n, op, ": ids_keep must have shape (N, K) with N = ", n, ", got ",
              ids.sizes());
}

// fill dtype must be the activation dtype or float32 (an fp32 mask token with half activations).
void check_fill_dtype(at::ScalarType act, at::ScalarType fill, const char* op) {
  TORCH_CHECK(fill == act || fill == at::kFloat, op, ": fill dtype must equal the activation dtype (", act,
              ") or be float32, got ", fill);
}

void check_rows(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kDouble,
              op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (N, rows, D), got ", t.sizes());
}

// Row tensors may have any (N, row) strides; only the last dimension must be dense.
at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

void check_gather(const at::Tensor& x, const at::Tensor& ids) {
  check_rows(x, "x", "gather_tokens");
  check_ids(ids, x.size(0), "gather_tokens");
  TORCH_CHECK(x.device() == ids.device(), "gather_tokens: x is on ", x.device(), " but ids_keep is on ", ids.device());
}

void check_gather_backward(const at::Tensor& grad, const at::Tensor& ids, int64_t length) {
  check_rows(grad, "grad", "_gather_tokens_backward");
  check_ids(ids, grad.size(0), "_gather_tokens_backward");
  TORCH_CHECK(grad.size(1) == ids.size(1), "_gather_tokens_backward: grad must be (N, K, D) with K = ", ids.size(1),
              ", got ", grad.sizes());
  TORCH_CHECK(length >= ids.size(1), "_gather_tokens_backward: length T = ", length, " must be >= K = ", ids.size(1));
  TORCH_CHECK(grad.device() == ids.device(), "_gather_tokens_backward: grad and ids_keep must share a device");
}

// Returns true for the per-token (N, T, D) fill, false for the broadcast (D,) token.
bool check_scatter(const at::Tensor& kept, const at::Tensor& ids, const at::Tensor& fill, int64_t length) {
  check_rows(kept, "kept", "scatter_tokens");
  check_ids(ids, kept.size(0), "scatter_tokens");
  const int64_t n = kept.size(0), k = kept.size(1), d = kept.size(2);
  TORCH_CHECK(ids.size(1) == k, "scatter_tokens: ids_keep must be (N, K) with K = ", k, ", got ", ids.sizes());
  TORCH_CHECK(length >= k, "scatter_tokens: length T = ", length, " must be >= K = ", k);
  check_fill_dtype(kept.scalar_type(), fill.scalar_type(), "scatter_tokens");
  const bool per_token = fill.dim() == 3;
  TORCH_CHECK((fill.dim() == 1 && fill.size(0) == d) ||
                  (per_token && fill.size(0) == n && fill.size(1) == length && fill.size(2) == d),
              "scatter_tokens: fill must be (D,) = (", d, ",) or (N, T, D) = (", n, ", ", length, ", ", d, "), got ",
              fill.sizes());
  TORCH_CHECK(kept.device() == ids.device() && kept.device() == fill.device(),
              "scatter_tokens: kept, ids_keep and fill must share a device");
  return per_token;
}

void check_scatter_backward(const at::Tensor& grad, const at::Tensor& ids, at::ScalarType fill_dtype) {
  check_rows(grad, "grad", "_scatter_tokens_backward");
  check_ids(ids, grad.size(0), "_scatter_tokens_backward");
  TORCH_CHECK(grad.size(1) >= ids.size(1), "_scatter_tokens_backward: grad must be (N, T, D) with T >= K = ",
              ids.size(1), ", got ", grad.sizes());
  check_fill_dtype(grad.scalar_type(), fill_dtype, "_scatter_tokens_backward");
  TORCH_CHECK(grad.device() == ids.device(), "_scatter_tokens_backward: grad and ids_keep must share a device");
}

// Rows per fixed reduction tile of the broadcast d_fill sum (CPU and CUDA use the same constant, so the
// partition never depends on the thread count or the device).
constexpr int64_t kFillTileRows = 128;

}  // namespace dit_kernels_tokens

namespace {

using namespace dit_kernels_tokens;

// Dispatch (activation scalar_t) x (fill_t in {scalar_t, float}).
#define DIT_TOKENS_DISPATCH(act_type, fill_type, NAME, ...)                        \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act_type, NAME, [&] { \
    if ((fill_type) == (act_type)) {                                              \
      using fill_t = scalar_t;                                                    \
      __VA_ARGS__();                                                              \
    } else {                                                                      \
      using fill_t = float;                                                       \
      __VA_ARGS__();                                                              \
    }                                                                             \
  })

// (N, T) inverse map: slot k of the kept row at position t, or -1. Raises on bad ids.
std::vector<int32_t> inverse_map(const at::Tensor& ids, int64_t N, int64_t T, const char* op) {
  const int64_t K = ids.size(1);
  TORCH_CHECK(T <= INT32_MAX && K <= INT32_MAX, op, ": T and K must fit in int32");
  std::vector<int32_t> inv(static_cast<size_t>(N * T), -1);
  const auto ic = ids.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    int32_t* row = inv.data() + n * T;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = ip[n * K + k];
      TORCH_CHECK(t >= 0 && t < T, op, ": ids_keep[", n, ", ", k, "] = ", t, " is out of range [0, ", T, ")");
      TORCH_CHECK(row[t] < 0, op, ": ids_keep[", n, "] repeats position ", t,
                  " (ids must be distinct per sample)");
      row[t] = static_cast<int32_t>(k);
    }
  }
  return inv;
}

template <typename dst_t, typename src_t>
inline void copy_row(dst_t* dst, const src_t* src, int64_t D) {
  if constexpr (std::is_same_v<dst_t, src_t>) {
    std::memcpy(dst, src, sizeof(dst_t) * D);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<dst_t>(static_cast<float>(src[d]));
  }
}

template <typename T>
inline void zero_row(T* dst, int64_t D) {
  std::fill(dst, dst + D, static_cast<T>(0));
}

}  // namespace

at::Tensor gather_tokens_cpu(const at::Tensor& x_in, const at::Tensor& ids_in) {
  check_gather(x_in, ids_in);
  const auto x = inner_contiguous(x_in);
  const auto ids = ids_in.contiguous();
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2), K = ids.size(1);
  auto out = at::empty({N, K, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N * K == 0) return out;
  // Range check first (cheap: reads N*K ids), so no row is read out of bounds.
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * K; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < T, "gather_tokens: ids_keep[", i / K, ", ", i % K, "] = ", ip[i],
                " is out of range [0, ", T, ")");
  }
  if (D == 0) return out;
  const int64_t sN = x.stride(0), sT = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * K, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / K;
        copy_row(op + r * D, xp + n * sN + ip[r] * sT, D);
      }
    });
  });
  return out;
}

at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad_in, const at::Tensor& ids, int64_t length) {
  check_gather_backward(grad_in, ids, length);
  const auto grad = inner_contiguous(grad_in);
  const int64_t N = grad.size(0), D = grad.size(2), T = length;
  auto dx = at::empty({N, T, D}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (N * T == 0) return dx;
  const auto inv = inverse_map(ids, N, T, "_gather_tokens_backward");
  if (D == 0) return dx;
  const int64_t sN = grad.stride(0), sK = grad.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_tokens_backward_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int32_t slot = inv[r];
        if (slot >= 0) {
          copy_row(dp + r * D, gp + (r / T) * sN + slot * sK, D);
        } else {
          zero_row(dp + r * D, D);
        }
      }
    });
  });
  return dx;
}

at::Tensor scatter_tokens_cpu(const at::Tensor& kept_in, const at::Tensor& ids, const at::Tensor& fill_in,
                              int64_t length) {
  const bool per_token = check_scatter(kept_in, ids, fill_in, length);
  const auto kept = inner_contiguous(kept_in);
  const auto fill = per_token ? inner_contiguous(fill_in) : fill_in.contiguous();
  const int64_t N = kept.size(0), D = kept.size(2), T = length;
  auto out = at::empty({N, T, D}, kept.options().memory_format(at::MemoryFormat::Contiguous));
  if (N * T == 0) return out;
  const auto inv = inverse_map(ids, N, T, "scatter_tokens");
  if (D == 0) return out;
  const int64_t kN = kept.stride(0), kK = kept.stride(1);
  // Broadcast token: (N, T) strides 0, so both forms share one loop.
  const int64_t fN = per_token ? fill.stride(0) : 0, fT = per_token ? fill.stride(1) : 0;
  DIT_TOKENS_DISPATCH(kept.scalar_type(), fill.scalar_type(), "scatter_tokens_cpu", [&] {
    const scalar_t* kp = kept.data_ptr<scalar_t>();
    const fill_t* fp = fill.data_ptr<fill_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / T, t = r - n * T;
        const int32_t slot = inv[r];
        if (slot >= 0) {
          copy_row(op + r * D, kp + n * kN + slot * kK, D);
        } else {
          copy_row(op + r * D, fp + n * fN + t * fT, D);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_tokens_backward_cpu(const at::Tensor& grad_in, const at::Tensor& ids,
                                                               bool fill_per_token, at::ScalarType fill_dtype) {
  check_scatter_backward(grad_in, ids, fill_dtype);
  const auto grad = inner_contiguous(grad_in);
  const int64_t N = grad.size(0), T = grad.size(1), D = grad.size(2), K = ids.size(1);
  const auto opts = grad.options().memory_format(at::MemoryFormat::Contiguous);
  auto dkept = at::empty({N, K, D}, opts);
  auto dfill = fill_per_token ? at::empty({N, T, D}, opts.dtype(fill_dtype)) : at::zeros({D}, opts.dtype(fill_dtype));
  if (N * T == 0 || D == 0) {
    if (N * T != 0) inverse_map(ids, N, T, "_scatter_tokens_backward");  // still validate ids
    return {dkept, dfill};
  }
  const auto inv = inverse_map(ids, N, T, "_scatter_tokens_backward");
  const int64_t gN = grad.stride(0), gT = grad.stride(1);
  DIT_TOKENS_DISPATCH(grad.scalar_type(), fill_dtype, "scatter_tokens_backward_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* kp = dkept.data_ptr<scalar_t>();
    fill_t* fp = dfill.data_ptr<fill_t>();
    if (fill_per_token) {
      // One pass over grad rows: kept rows go to dkept (and 0 to dfill), removed rows to dfill.
      at::parallel_for(0, N * T, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / T, t = r - n * T;
          const scalar_t* g = gp + n * gN + t * gT;
          const int32_t slot = inv[r];
          if (slot >= 0) {
            copy_row(kp + (n * K + slot) * D, g, D);
            zero_row(fp + r * D, D);
          } else {
            copy_row(fp + r * D, g, D);
          }
        }
      });
      return;
    }
    // Broadcast token: fixed tiles of kFillTileRows rows -> acc partials, then a fixed-order sum over
    // tiles (the result does not depend on the number of threads).
    using acc = acc_t<scalar_t>;
    const int64_t rows = N * T;
    const int64_t tiles = (rows + kFillTileRows - 1) / kFillTileRows;
    std::vector<acc> partial(static_cast<size_t>(tiles * D), acc(0));
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        acc* part = partial.data() + tile * D;
        const int64_t r_end = std::min(rows, (tile + 1) * kFillTileRows);
        for (int64_t r = tile * kFillTileRows; r < r_end; ++r) {
          const int64_t n = r / T, t = r - n * T;
          const scalar_t* g = gp + n * gN + t * gT;
          const int32_t slot = inv[r];
          if (slot >= 0) {
            copy_row(kp + (n * K + slot) * D, g, D);
          } else {
            for (int64_t d = 0; d < D; ++d) part[d] += static_cast<acc>(g[d]);
          }
        }
      }
    });
    std::vector<acc> total(static_cast<size_t>(D), acc(0));
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const acc* part = partial.data() + tile * D;
      for (int64_t d = 0; d < D; ++d) total[d] += part[d];
    }
    for (int64_t d = 0; d < D; ++d) fp[d] = static_cast<fill_t>(total[d]);
  });
  return {dkept, dfill};
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("_gather_tokens_backward", &gather_tokens_backward_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
  m.impl("_scatter_tokens_backward", &scatter_tokens_backward_cpu);
}
