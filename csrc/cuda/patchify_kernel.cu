// CUDA kernels for patchify / unpatchify, kernels.md §2.1: exact permutations (bit-identical to the
// PyTorch reshape/permute reference), so they move raw 2/4/8-byte words and never do arithmetic on values.
//
// Formulas (token tau = i*w + j, h = H/p, w = W/p, T = h*w):
//   conv layout   (patchify, _patchify_backward):   P[n, tau, c*p*p + a*p + b]   = x[n, c, i*p + a, j*p + b]
//   output layout (unpatchify, _unpatchify_backward): y[n, tau, (a*p + b)*C_all + c] = img[n, c, i*p + a, j*p + b]
//   unpatchify keeps channels c < C <= C_all; its backward writes zeros for c >= C.
//
// Parallelisation: one thread per OUTPUT element with a grid-stride loop, so writes are fully
// coalesced; reads gather p-element runs (conv layout) or C_all-strided words (output layout)
// that neighbouring threads/warps complete in L1/L2. 32-bit index math whenever the tensor has
// < 2^30 elements (64-bit otherwise).  Two kernels (image -> tokens, tokens -> image) x two
// feature layouts x three word sizes x two index types.
//
// Memory-traffic floor (read + write, bf16; fp32 doubles it):
//   latent DiT-XL/2 shape (N = 256, C = 4, 32 x 32, p = 2): 1.05 M elements -> 2.1 MB + 2.1 MB = 4.2 MB;
//     unpatchify with learned sigma (C_all = 8, C = 4): reads the 4.2 MB token tensor at sector
//     granularity, writes 2.1 MB.
//   pixel shape (N = 64, C = 3, 256 x 256, p = 16): 12.6 M elements -> 25.2 MB + 25.2 MB = 50.3 MB.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common.h"
#include "cuda_utils.cuh"

namespace {

constexpr int kPatchThreads = 256;

// Token-layout geometry shared by both directions.
struct PatchGeom {
  int64_t n, c_img, height, width;  // image (N, C_img, H, W)
  int64_t p, w, tokens, c_feat;     // tokens (N, T, p*p*C_feat), T = (H/p)*(W/p), w = W/p
};

// tok[n, tau, f] <- img[n, c, i*p + a, j*p + b]  (zero when c >= c_img); one thread per token element.
template <typename E, typename I, bool CONV>
__global__ void __launch_bounds__(kPatchThreads)
    image_to_tokens_kernel(const E* __restrict__ img, E* __restrict__ tok, I total, I tokens, I w, I p, I c_img,
                           I c_feat, I height, I width) {
  const I pp = p * p;
  const I feat = pp * c_feat;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const I f = e % feat;
    const I rest = e / feat;
    const I t = rest % tokens;
    const I n = rest / tokens;
    I c, ab;
    if constexpr (CONV) {
      c = f / pp;
      ab = f % pp;
    } else {
      ab = f / c_feat;
      c = f % c_feat;
    }
    const I a = ab / p, b = ab % p;
    const I i = t / w, j = t % w;
    E v = E(0);  // all-zero bits == +0.0 in every float format
    if (c < c_img) v = img[((n * c_img + c) * height + i * p + a) * width + j * p + b];
    tok[e] = v;
  }
}

// img[n, c, i*p + a, j*p + b] <- tok[n, tau, f] for c < c_img; one thread per image element.
template <typename E, typename I, bool CONV>
__global__ void __launch_bounds__(kPatchThreads)
    tokens_to_image_kernel(const E* __restrict__ tok, E* __restrict__ img, I total, I tokens, I w, I p, I c_img,
                           I c_feat, I height, I width) {
  const I pp = p * p;
  const I feat = pp * c_feat;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const I xx = e % width;
    const I r = e / width;
    const I yy = r % height;
    const I r2 = r / height;
    const I c = r2 % c_img;
    const I n = r2 / c_img;
    const I i = yy / p, a = yy % p;
    const I j = xx / p, b = xx % p;
    const I f = CONV ? c * pp + a * p + b : (a * p + b) * c_feat + c;
    img[e] = tok[(n * tokens + i * w + j) * feat + f];
  }
}

template <typename E, typename I, bool TO_TOKENS, bool CONV>
void launch_typed(const void* src, void* dst, int64_t total, const PatchGeom& g) {
  const int64_t blocks = std::min<int64_t>(dit::ceil_div(total, kPatchThreads), static_cast<int64_t>(dit::sm_count()) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  if constexpr (TO_TOKENS) {
    image_to_tokens_kernel<E, I, CONV><<<static_cast<unsigned>(blocks), kPatchThreads, 0, stream>>>(
        static_cast<const E*>(src), static_cast<E*>(dst), static_cast<I>(total), static_cast<I>(g.tokens),
        static_cast<I>(g.w), static_cast<I>(g.p), static_cast<I>(g.c_img), static_cast<I>(g.c_feat),
        static_cast<I>(g.height), static_cast<I>(g.width));
  } else {
    tokens_to_image_kernel<E, I, CONV><<<static_cast<unsigned>(blocks), kPatchThreads, 0, stream>>>(
        static_cast<const E*>(src), static_cast<E*>(dst), static_cast<I>(total), static_cast<I>(g.tokens),
        static_cast<I>(g.w), static_cast<I>(g.p), static_cast<I>(g.c_img), static_cast<I>(g.c_feat),
        static_cast<I>(g.height), static_cast<I>(g.width));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Copies src -> dst (both contiguous, same dtype) with the permutation; `dst` decides the element count.
template <bool TO_TOKENS, bool CONV>
void launch_permute(const at::Tensor& src, at::Tensor& dst, const PatchGeom& g) {
  const int64_t total = dst.numel();
  if (total == 0) return;
  // Largest index formed inside the kernels is < max(src.numel(), dst.numel()); keep the loop
  // counter (< total + grid stride) far from overflow as well.
  const bool small = std::max(total, src.numel()) < (int64_t(1) << 30);
  const void* s = src.data_ptr();
  void* d = dst.data_ptr();
  auto run = [&](auto word) {
    using E = decltype(word);
    if (small) {
      launch_typed<E, int32_t, TO_TOKENS, CONV>(s, d, total, g);
    } else {
      launch_typed<E, int64_t, TO_TOKENS, CONV>(s, d, total, g);
    }
  };
  switch (dst.element_size()) {
    case 2: run(uint16_t{}); break;
    case 4: run(uint32_t{}); break;
    case 8: run(uint64_t{}); break;
    default: TORCH_CHECK(false, "dit_kernels patchify: unsupported element size ", dst.element_size());
  }
}

void check_patch_size(int64_t p) { TORCH_CHECK(p >= 1, "patch_size must be >= 1, got ", p); }

void check_image_size(int64_t height, int64_t width, int64_t p) {
  TORCH_CHECK(height >= 0 && width >= 0 && height % p == 0 && width % p == 0, "patch_size ", p,
              " must divide the image height ", height, " and width ", width);
}

}  // namespace

// x: (N, C, H, W) float (made contiguous), H and W divisible by p.
// Returns (N, T, C*p*p) in x.dtype with features in Conv2d-weight order (c, a, b).
at::Tensor patchify_cuda(const at::Tensor& x, int64_t patch_size) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_DIM(x, 4, "(N, C, H, W)");
  DIT_CHECK_CUDA(x);
  check_patch_size(patch_size);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), p = patch_size;
  check_image_size(H, W, p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const PatchGeom g{N, C, H, W, p, W / p, (H / p) * (W / p), C};
  auto out = at::empty({N, g.tokens, C * p * p}, x.options());
  launch_permute</*TO_TOKENS=*/true, /*CONV=*/true>(xc, out, g);
  return out;
}

// grad: (N, T, C*p*p) conv layout, T = (height/p)*(width/p). Returns (N, C, height, width).
at::Tensor patchify_backward_cuda(const at::Tensor& grad, int64_t patch_size, int64_t height, int64_t width) {
  DIT_CHECK_FLOAT(grad);
  DIT_CHECK_DIM(grad, 3, "(N, T, C*p*p)");
  DIT_CHECK_CUDA(grad);
  check_patch_size(patch_size);
  const int64_t p = patch_size;
  check_image_size(height, width, p);
  const int64_t N = grad.size(0), T = grad.size(1), F = grad.size(2);
  TORCH_CHECK(T == (height / p) * (width / p), "grad has ", T, " tokens but a ", height, "x", width,
              " image with patch ", p, " has ", (height / p) * (width / p));
  TORCH_CHECK(F % (p * p) == 0, "grad's last dim ", F, " must be a multiple of p*p = ", p * p);
  const int64_t C = F / (p * p);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  const PatchGeom g{N, C, height, width, p, width / p, T, C};
  auto out = at::empty({N, C, height, width}, grad.options());
  launch_permute</*TO_TOKENS=*/false, /*CONV=*/true>(gc, out, g);
  return out;
}

// y: (N, T, p*p*C_all) with features (a, b, c), T = (height/p)*(width/p); 1 <= channels <= C_all.
// Returns (N, channels, height, width) in y.dtype.
at::Tensor unpatchify_cuda(const at::Tensor& y, int64_t patch_size, int64_t height, int64_t width, int64_t channels) {
  DIT_CHECK_FLOAT(y);
  DIT_CHECK_DIM(y, 3, "(N, T, p*p*C)");
  DIT_CHECK_CUDA(y);
  check_patch_size(patch_size);
  const int64_t p = patch_size;
  check_image_size(height, width, p);
  const int64_t N = y.size(0), T = y.size(1), F = y.size(2);
  TORCH_CHECK(T == (height / p) * (width / p), "y has ", T, " tokens but a ", height, "x", width,
              " image with patch ", p, " has ", (height / p) * (width / p));
  TORCH_CHECK(F % (p * p) == 0, "y's last dim ", F, " must be a multiple of p*p = ", p * p);
  const int64_t c_all = F / (p * p);
  TORCH_CHECK(channels >= 1 && channels <= c_all, "channels must be in [1, ", c_all, "], got ", channels);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const PatchGeom g{N, channels, height, width, p, width / p, T, c_all};
  auto out = at::empty({N, channels, height, width}, y.options());
  launch_permute</*TO_TOKENS=*/false, /*CONV=*/false>(yc, out, g);
  return out;
}

// grad: (N, C, H, W), C <= all_channels. Returns (N, T, p*p*all_channels) with features (a, b, c),
// zeros for the channels c >= C that unpatchify dropped.
at::Tensor unpatchify_backward_cuda(const at::Tensor& grad, int64_t patch_size, int64_t all_channels) {
  DIT_CHECK_FLOAT(grad);
  DIT_CHECK_DIM(grad, 4, "(N, C, H, W)");
  DIT_CHECK_CUDA(grad);
  check_patch_size(patch_size);
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), p = patch_size;
  check_image_size(H, W, p);
  TORCH_CHECK(C <= all_channels, "grad has ", C, " channels, more than all_channels = ", all_channels);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  const PatchGeom g{N, C, H, W, p, W / p, (H / p) * (W / p), all_channels};
  auto out = at::empty({N, g.tokens, p * p * all_channels}, grad.options());
  launch_permute</*TO_TOKENS=*/true, /*CONV=*/false>(gc, out, g);
  return out;
}

TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("_patchify_backward", &patchify_backward_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
  m.impl("_unpatchify_backward", &unpatchify_backward_cuda);
}
