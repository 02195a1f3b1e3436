// CUDA kernels for patchify / unpatchify: exact permutations (bit-identical to the
// PyTorch reshape/permute reference), so they move raw 2/4/8-byte words and never do arithmetic on values.
//
// Formulas (token tau = i*w + j, h = H/p, w = W/p, T = h*w):
//   conv layout   (patchify, _patchify_backward):   P[n, tau, c*p*p + a*p + b]   = x[n, c, i*p + a, j*p + b]
//   output layout (unpatchify, _unpatchify_backward): y[n, tau, (a*p + b)*C_all + c] = img[n, c, i*p + a, j*p + b]
//   unpatchify keeps channels c < C <= C_all; its backward writes zeros for c >= C.
//
// Parallelisation (fast path, patch_rows_kernel): a CTA transposes whole token rows (the w tokens
// of one patch row and the p image rows they come from) through shared memory: 16-byte vector
// loads of the source side, kPatchBatch in flight per thread, then 16-byte vector stores of the
// destination side gathered from shared memory with a per-feature offset table (index arithmetic
// once per vector). Taken when p*W, W and p*p*C_feat are multiples of the 16-byte vector and the
// tensors are 16-byte aligned (both benchmark shapes, every DiT shape).
// Generic path (any shape): one thread per OUTPUT element with a grid-stride loop, so writes are
// fully coalesced; reads gather p-element runs (conv layout) or C_all-strided words (output layout)
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

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

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

// ---- Token-row transpose through shared memory (the fast path) -----------------------------------
// Unit: a token row r = (n, i), i.e. the w tokens [r*w, r*w + w). Its image side is C_img channel
// segments of p image rows (p*W contiguous elements each, at ((n*C_img + c)*H + i*p)*W); its token
// side is one contiguous block of w*F elements (F = p*p*C_feat), and consecutive token rows are
// consecutive blocks. A CTA takes R token rows: (1) it copies the source side into shared memory
// with 16-byte vector loads, kPatchBatch per thread in flight before their shared-memory stores;
// (2) it writes the destination side with 16-byte vectors gathered from shared memory. The index
// arithmetic is done once per vector (a few divisions), then carried element by element: no
// per-feature table in shared memory. Needs p*W, W and F to be multiples of VEC = 16 / sizeof(E),
// 16-byte aligned tensors and R rows of source side in shared memory; the element kernels above do
// the rest.
//
// Shared-memory layout, padded against bank conflicts (PatchRows::stride, set by launch_rows):
//   image side (TO_TOKENS): image rows of W elements at a stride of W + pad, the pad making the
//     stride one run (p elements) longer modulo 128 bytes, so the runs a quarter-warp reads from
//     consecutive patch rows tile the 32 banks (unpadded, W = 256 bf16 rows are 512 bytes apart:
//     4-way conflicts);
//   token side (unpatchify, patchify backward): tokens of F elements at a stride of F + pad; with
//     F = 768 bf16 (p = 16, C = 3) unpadded tokens are 1536 bytes apart, i.e. all on the same bank
//     (16-way conflicts in the output-layout gather, 4-way for the conv layout's 16-byte reads). The
//     conv layout pads one run modulo 128 bytes (conflict-free); the output layout pads 8 bytes
//     (the 2-byte element gathers of a warp fall on 16+ banks: at most 2-way).
// 16-byte vectors per thread loaded before they are stored; 2 from the image (the padded
// shared-memory row address costs registers: 4 would spill at the 32 registers of 8 CTAs per SM).
template <bool TO_TOKENS>
constexpr int kPatchBatch = TO_TOKENS ? 2 : 4;

struct PatchRows {
  int64_t rows;    // token rows N * h
  int64_t h;       // token rows per sample
  int64_t w, p, c_img, c_feat, width;  // tokens per row, patch, image / token channels, image width W
  int64_t r_batch;  // token rows per CTA
  int64_t stride;   // shared memory: elements between image rows (TO_TOKENS) or tokens (else)
};

// RUNS: p % VEC == 0 (a 16-byte vector never leaves one run of a patch row). Resident CTAs: 8 (32
// registers) from the image, 6 into the image (40 registers: the padded token-stride addressing
// spilled 8-16 B of the 64-bit-word instantiations at 32).
template <typename E, bool TO_TOKENS, bool CONV, bool RUNS>
__global__ void __launch_bounds__(kPatchThreads, TO_TOKENS ? 8 : 6)
    patch_rows_kernel(const E* __restrict__ src, E* __restrict__ dst, PatchRows g) {
  using W16 = uint4;
  constexpr int VEC = 16 / static_cast<int>(sizeof(E));
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Offsets inside one CTA's token rows fit in 32 bits (they index shared memory); global offsets
  // are formed in 64 bits.
  const int p = static_cast<int>(g.p), width = static_cast<int>(g.width), c_img = static_cast<int>(g.c_img),
            c_feat = static_cast<int>(g.c_feat), stride = static_cast<int>(g.stride);
  const int pp = p * p;
  const int F = pp * c_feat;         // features per token
  const int seg = p * width;         // elements of one channel segment (p image rows)
  const int img_row = c_img * seg;   // image side of one token row
  const int tok_row = static_cast<int>(g.w) * F;  // token side of one token row
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * g.r_batch;
  const int nr = static_cast<int>(g.rows - r0 < g.r_batch ? g.rows - r0 : g.r_batch);
  const int segs = nr * c_img;  // image-side segments of this CTA
  int64_t* seg_base = reinterpret_cast<int64_t*>(smem_raw);
  E* data = reinterpret_cast<E*>(smem_raw + ((g.r_batch * c_img * 8 + 15) / 16) * 16);
  for (int k = threadIdx.x; k < segs; k += blockDim.x) {  // global offset of image-side segment (rr, c)
    const int64_t r = r0 + k / c_img, n = r / g.h, i = r % g.h;
    seg_base[k] = ((n * c_img + k % c_img) * g.h * p + i * p) * width;
  }
  if (TO_TOKENS) __syncthreads();  // seg_base is read below

  // (1) source side -> shared memory
  const int src_vecs = nr * (TO_TOKENS ? img_row : tok_row) / VEC;
  for (int u0 = threadIdx.x; u0 < src_vecs; u0 += blockDim.x * kPatchBatch<TO_TOKENS>) {
    W16 v[kPatchBatch<TO_TOKENS>];
#pragma unroll
    for (int k = 0; k < kPatchBatch<TO_TOKENS>; ++k) {
      const int u = u0 + k * blockDim.x;
      if (u < src_vecs) {
        const int e = u * VEC;
        const int64_t off = TO_TOKENS ? seg_base[e / seg] + e % seg
                                      : r0 * tok_row + e;  // the token rows are one contiguous block
        v[k] = __ldg(reinterpret_cast<const W16*>(src + off));
      }
    }
#pragma unroll
    for (int k = 0; k < kPatchBatch<TO_TOKENS>; ++k) {
      const int u = u0 + k * blockDim.x;
      if (u < src_vecs) {
        const int e = u * VEC;
        // a vector stays inside one image row (W % VEC == 0) or one token (F % VEC == 0)
        E* to = TO_TOKENS ? data + (e / width) * stride + e % width : data + (e / F) * stride + e % F;
        if (TO_TOKENS || stride % VEC == 0) {
          *reinterpret_cast<W16*>(to) = v[k];
        } else {  // 8-byte padded tokens
          const uint2* h = reinterpret_cast<const uint2*>(&v[k]);
          reinterpret_cast<uint2*>(to)[0] = h[0];
          reinterpret_cast<uint2*>(to)[1] = h[1];
        }
      }
    }
  }
  __syncthreads();

  // (2) destination side, one 16-byte vector per step
  const int dst_vecs = nr * (TO_TOKENS ? tok_row : img_row) / VEC;
  for (int u = threadIdx.x; u < dst_vecs; u += blockDim.x) {
    const int e = u * VEC;
    union {
      W16 word;
      E el[VEC];
    } out;
    int64_t off;
    // With RUNS a vector never leaves one run of a patch row (one token, one (c, a)): in the conv
    // layout its elements are contiguous on both sides (one 16-byte shared-memory read), in the
    // output layout they are C_feat apart in the token.
    if (TO_TOKENS) {  // element e = (rr, j, f) of the token block; F % VEC == 0: one token per vector
      const int rr = e / tok_row, rem = e % tok_row;
      const int j = rem / F, f = rem % F;
      int c, a, b;  // feature f = (c, a, b): conv (c * p + a) * p + b, output layout (a * p + b) * C_feat + c
      if (CONV) {
        c = f / pp;
        a = (f / p) % p;
        b = f % p;
      } else {
        c = f % c_feat;
        a = f / c_feat / p;
        b = (f / c_feat) % p;
      }
      const E* rows = data + rr * c_img * p * stride + j * p;  // this token row's image rows, column j * p
      if constexpr (CONV && RUNS) {
        out.word = *reinterpret_cast<const W16*>(rows + (c * p + a) * stride + b);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.el[k] = c < c_img ? rows[(c * p + a) * stride + b] : E(0);
          if (CONV) {
            if (++b == p) {
              b = 0;
              if (++a == p) {
                a = 0;
                ++c;
              }
            }
          } else if (++c == c_feat) {
            c = 0;
            if (++b == p) {
              b = 0;
              ++a;
            }
          }
        }
      }
      off = r0 * tok_row + e;
    } else {  // element e = (rr, c, a, x) of the image side; W % VEC == 0: one image row per vector
      const int s_idx = e / seg, q = e % seg;
      const int rr = s_idx / c_img, c = s_idx % c_img;
      const int a = q / width, x = q % width;
      int j = x / p, b = x % p;
      const E* tok = data + rr * static_cast<int>(g.w) * stride;  // token j of this token row: tok + j * stride
      auto feat = [&](int bb) { return CONV ? (c * p + a) * p + bb : (a * p + bb) * c_feat + c; };
      if constexpr (RUNS) {
        const E* first = tok + j * stride + feat(b);
        if constexpr (CONV) {
          out.word = *reinterpret_cast<const W16*>(first);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) out.el[k] = first[k * c_feat];
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.el[k] = tok[j * stride + feat(b)];
          if (++b == p) {
            b = 0;
            ++j;
          }
        }
      }
      off = seg_base[s_idx] + q;
    }
    *reinterpret_cast<W16*>(dst + off) = out.word;
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

// The token-row transpose when the shapes and pointers allow it (see patch_rows_kernel); false otherwise.
template <typename E, bool TO_TOKENS, bool CONV>
bool launch_rows(const void* src, void* dst, const PatchGeom& g) {
  constexpr int64_t VEC = 16 / static_cast<int64_t>(sizeof(E));
  const int64_t F = g.p * g.p * g.c_feat;
  if ((g.p * g.width) % VEC != 0 || g.width % VEC != 0 || F % VEC != 0 || !dit::is_aligned(src, 16) ||
      !dit::is_aligned(dst, 16))
    return false;
  const int64_t h = g.height / g.p;
  const int64_t rows = g.n * h;
  const int64_t esize = static_cast<int64_t>(sizeof(E));
  const bool runs = g.p % VEC == 0;
  // Padded shared-memory stride (see the layout note at patch_rows_kernel), in elements: image
  // rows (TO_TOKENS) or tokens. `one_run_longer`: the pad that makes a stride of `len` elements one
  // run of p elements longer modulo 128 bytes (none when a run covers the 32 banks by itself).
  auto one_run_longer = [&](int64_t len) -> int64_t {
    const int64_t run = g.p * esize;
    return run >= 128 ? 0 : (((run - len * esize) % 128) + 128) % 128 / esize;
  };
  int64_t stride;
  if (TO_TOKENS) {
    stride = g.width + (runs ? one_run_longer(g.width) : 0);
  } else {
    stride = F + (CONV && runs ? one_run_longer(F) : std::max<int64_t>(1, 8 / esize));
  }
  const int64_t row_elems = TO_TOKENS ? g.c_img * g.p * stride : g.w * stride;  // one token row in shared memory
  const int64_t row_bytes = row_elems * esize;
  const int64_t seg_bytes = dit::ceil_div(16 * g.c_img, int64_t(16)) * 16;
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  if (seg_bytes + row_bytes > optin) return false;
  // Token rows per CTA: up to ~32 KB of source side, while leaving >= 8 CTAs per SM of work.
  const int64_t r_batch = std::max<int64_t>(
      1, std::min<int64_t>((32 * 1024) / row_bytes, dit::ceil_div(rows, static_cast<int64_t>(dit::sm_count()) * 8)));
  const int64_t smem = dit::ceil_div(r_batch * g.c_img * 8, int64_t(16)) * 16 + r_batch * row_bytes;
  // In-CTA offsets are 32-bit: the larger side of r_batch token rows must fit.
  if (r_batch * std::max(g.c_img * g.p * stride, std::max(g.c_img, g.c_feat) * g.p * g.width) >= (int64_t(1) << 31))
    return false;
  const PatchRows rg{rows, h, g.w, g.p, g.c_img, g.c_feat, g.width, r_batch, stride};
  auto launch = [&](auto runs) {
    auto kernel = patch_rows_kernel<E, TO_TOKENS, CONV, decltype(runs)::value>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(dit::ceil_div(rows, r_batch)), kPatchThreads, static_cast<size_t>(smem),
             at::cuda::getCurrentCUDAStream()>>>(static_cast<const E*>(src), static_cast<E*>(dst), rg);
  };
  if (runs) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
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
    if (launch_rows<E, TO_TOKENS, CONV>(s, d, g)) return;
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
