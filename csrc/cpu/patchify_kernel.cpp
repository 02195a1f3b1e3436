// CPU kernels for patchify / unpatchify: exact permutations (pure copies, bit-identical to
// the reshape/permute reference). Token tau = i*w + j on the (h, w) = (H/p, W/p) grid.
//
//   patchify   (conv layout):   P[n, tau, c*p*p + a*p + b]        = x[n, c, i*p + a, j*p + b]
//   unpatchify (output layout): out[n, c, i*p + a, j*p + b]       = y[n, tau, (a*p + b)*C_all + c], c < C
// _patchify_backward is the inverse of patchify; _unpatchify_backward the inverse of
// unpatchify, with zeros for the dropped channels c >= C.
//
// Parallel over the rows of the output (tokens, or image rows (n, c, H row)), so every
// output element has one writer. Inputs may have any strides; outputs are contiguous.
#include <ATen/Parallel.h>

#include "../common.h"

namespace {

constexpr int64_t kGrain = 16;  // output rows per task

// (N, C, H, W) with its strides.
struct Img {
  int64_t sn, sc, sh, sw;
};

Img img_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// patchify: one task per output token row (n, tau); x (N, C, H, W) -> out (N, T, C*p*p).
template <typename scalar_t>
void patchify_impl(const at::Tensor& x, int64_t p, at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), w = x.size(3) / p, T = (x.size(2) / p) * w, F = C * p * p;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const Img s = img_strides(x);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N * T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / T, tau = r % T, i = tau / w, j = tau % w;
      scalar_t* orow = op + r * F;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t a = 0; a < p; ++a) {
          const scalar_t* src = xp + n * s.sn + c * s.sc + (i * p + a) * s.sh + (j * p) * s.sw;
          scalar_t* dst = orow + (c * p + a) * p;
          for (int64_t b = 0; b < p; ++b) dst[b] = src[b * s.sw];
        }
      }
    }
  });
}

// _patchify_backward: one task per output image row (n, c, row); grad (N, T, C*p*p) -> (N, C, H, W).
template <typename scalar_t>
void patchify_backward_impl(const at::Tensor& grad, int64_t p, at::Tensor& out) {
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), w = W / p;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const int64_t gsn = grad.stride(0), gst = grad.stride(1), gsf = grad.stride(2);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N * C * H, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = r % H, c = (r / H) % C, n = r / (H * C), i = row / p, a = row % p;
      scalar_t* orow = op + r * W;
      for (int64_t j = 0; j < w; ++j) {
        const scalar_t* src = gp + n * gsn + (i * w + j) * gst + ((c * p + a) * p) * gsf;
        for (int64_t b = 0; b < p; ++b) orow[j * p + b] = src[b * gsf];
      }
    }
  });
}

// unpatchify: one task per output image row (n, c, row); y (N, T, p*p*C_all) -> (N, C, H, W).
// Only the first C channels are read (no full-size intermediate).
template <typename scalar_t>
void unpatchify_impl(const at::Tensor& y, int64_t p, int64_t c_all, at::Tensor& out) {
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), w = W / p;
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const int64_t ysn = y.stride(0), yst = y.stride(1), ysf = y.stride(2);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N * C * H, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = r % H, c = (r / H) % C, n = r / (H * C), i = row / p, a = row % p;
      scalar_t* orow = op + r * W;
      for (int64_t j = 0; j < w; ++j) {
        const scalar_t* src = yp + n * ysn + (i * w + j) * yst + (a * p * c_all + c) * ysf;
        for (int64_t b = 0; b < p; ++b) orow[j * p + b] = src[b * c_all * ysf];
      }
    }
  });
}

// _unpatchify_backward: one task per output token row (n, tau); grad (N, C, H, W) ->
// (N, T, p*p*C_all), zeros for channels c >= C.
template <typename scalar_t>
void unpatchify_backward_impl(const at::Tensor& grad, int64_t p, int64_t c_all, at::Tensor& out) {
  const int64_t N = grad.size(0), C = grad.size(1), w = grad.size(3) / p, T = (grad.size(2) / p) * w,
                F = p * p * c_all;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const Img s = img_strides(grad);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N * T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / T, tau = r % T, i = tau / w, j = tau % w;
      scalar_t* orow = op + r * F;
      for (int64_t a = 0; a < p; ++a) {
        for (int64_t b = 0; b < p; ++b) {
          const scalar_t* src = gp + n * s.sn + (i * p + a) * s.sh + (j * p + b) * s.sw;
          scalar_t* dst = orow + (a * p + b) * c_all;
          for (int64_t c = 0; c < C; ++c) dst[c] = src[c * s.sc];
          for (int64_t c = C; c < c_all; ++c) dst[c] = scalar_t(0);
        }
      }
    }
  });
}

void check_patch_size(int64_t p) { TORCH_CHECK(p >= 1, "patch_size must be >= 1, got ", p); }

#define DIT_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

// x: (N, C, H, W) float, any strides; H, W divisible by p. Returns (N, T, C*p*p) contiguous.
at::Tensor patchify_cpu(const at::Tensor& x, int64_t patch_size) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_DIM(x, 4, "(N, C, H, W)");
  check_patch_size(patch_size);
  const int64_t p = patch_size;
  TORCH_CHECK(x.size(2) % p == 0 && x.size(3) % p == 0, "patch_size ", p, " must divide H and W, got x of shape ",
              x.sizes());
  auto out = at::empty({x.size(0), (x.size(2) / p) * (x.size(3) / p), x.size(1) * p * p}, x.options());
  if (out.numel() == 0) return out;
  DIT_DISPATCH_FLOAT(x.scalar_type(), "patchify_cpu", [&] { patchify_impl<scalar_t>(x, p, out); });
  return out;
}

// grad: (N, T, C*p*p), any strides, T = (height/p)*(width/p). Returns (N, C, height, width).
at::Tensor patchify_backward_cpu(const at::Tensor& grad, int64_t patch_size, int64_t height, int64_t width) {
  DIT_CHECK_FLOAT(grad);
  DIT_CHECK_DIM(grad, 3, "(N, T, C*p*p)");
  check_patch_size(patch_size);
  const int64_t p = patch_size;
  TORCH_CHECK(height >= 0 && width >= 0 && height % p == 0 && width % p == 0, "patch_size ", p,
              " must divide height ", height, " and width ", width);
  TORCH_CHECK(grad.size(1) == (height / p) * (width / p), "grad has ", grad.size(1), " tokens, expected ",
              (height / p) * (width / p), " for a ", height, "x", width, " image with patch ", p);
  TORCH_CHECK(grad.size(2) % (p * p) == 0, "grad's last dim ", grad.size(2), " must be a multiple of p*p = ", p * p);
  auto out = at::empty({grad.size(0), grad.size(2) / (p * p), height, width}, grad.options());
  if (out.numel() == 0) return out;
  DIT_DISPATCH_FLOAT(grad.scalar_type(), "patchify_backward_cpu", [&] { patchify_backward_impl<scalar_t>(grad, p, out); });
  return out;
}

// y: (N, T, p*p*C_all), any strides, T = (height/p)*(width/p); 1 <= channels <= C_all.
// Returns (N, channels, height, width) contiguous.
at::Tensor unpatchify_cpu(const at::Tensor& y, int64_t patch_size, int64_t height, int64_t width, int64_t channels) {
  DIT_CHECK_FLOAT(y);
  DIT_CHECK_DIM(y, 3, "(N, T, p*p*C)");
  check_patch_size(patch_size);
  const int64_t p = patch_size;
  TORCH_CHECK(height >= 0 && width >= 0 && height % p == 0 && width % p == 0, "patch_size ", p,
              " must divide height ", height, " and width ", width);
  TORCH_CHECK(y.size(1) == (height / p) * (width / p), "y has ", y.size(1), " tokens, expected ",
              (height / p) * (width / p), " for a ", height, "x", width, " image with patch ", p);
  TORCH_CHECK(y.size(2) % (p * p) == 0, "y's last dim ", y.size(2), " must be a multiple of p*p = ", p * p);
  const int64_t c_all = y.size(2) / (p * p);
  TORCH_CHECK(channels >= 1 && channels <= c_all, "channels must be in [1, ", c_all, "], got ", channels);
  auto out = at::empty({y.size(0), channels, height, width}, y.options());
  if (out.numel() == 0) return out;
  DIT_DISPATCH_FLOAT(y.scalar_type(), "unpatchify_cpu", [&] { unpatchify_impl<scalar_t>(y, p, c_all, out); });
  return out;
}

// grad: (N, C, H, W), any strides; C <= all_channels. Returns (N, T, p*p*all_channels) with
// zeros for channels >= C.
at::Tensor unpatchify_backward_cpu(const at::Tensor& grad, int64_t patch_size, int64_t all_channels) {
  DIT_CHECK_FLOAT(grad);
  DIT_CHECK_DIM(grad, 4, "(N, C, H, W)");
  check_patch_size(patch_size);
  const int64_t p = patch_size;
  TORCH_CHECK(grad.size(2) % p == 0 && grad.size(3) % p == 0, "patch_size ", p,
              " must divide H and W, got grad of shape ", grad.sizes());
  TORCH_CHECK(all_channels >= grad.size(1), "all_channels (", all_channels, ") must be >= grad's channels (",
              grad.size(1), ")");
  auto out = at::empty({grad.size(0), (grad.size(2) / p) * (grad.size(3) / p), p * p * all_channels}, grad.options());
  if (out.numel() == 0) return out;
  DIT_DISPATCH_FLOAT(grad.scalar_type(), "unpatchify_backward_cpu",
                     [&] { unpatchify_backward_impl<scalar_t>(grad, p, all_channels, out); });
  return out;
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("_patchify_backward", &patchify_backward_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
  m.impl("_unpatchify_backward", &unpatchify_backward_cpu);
}
