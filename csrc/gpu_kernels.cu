// GPU kernels of the layout ops. One source for CUDA (nvcc) and HIP (hipcc): only the runtime
// header and the names of a few runtime calls differ (GPU_RT below). No torch headers, so CI
// can compile-check this file for gfx90a with a bare hipcc.
//
// Every kernel is a grid-stride loop over output units; consecutive threads write consecutive
// output units, so stores are coalesced and the reads of a warp cover few rows.

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define GPU_RT(name) hip##name
typedef hipStream_t gpu_stream_t;
typedef hipError_t gpu_error_t;
#else
#include <cuda_runtime.h>
#define GPU_RT(name) cuda##name
typedef cudaStream_t gpu_stream_t;
typedef cudaError_t gpu_error_t;
#endif

#include "gpu_kernels.h"

namespace moeprep {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename Kernel, typename... Args>
int launch(int64_t items, void* stream, Kernel kernel, Args... args) {
  if (items <= 0) return 0;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  kernel<<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0,
           static_cast<gpu_stream_t>(stream)>>>(args...);
  return static_cast<int>(GPU_RT(GetLastError)());
}

int log2_of(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// The launchers expect 16-byte aligned tensors (the torch binding guarantees it).

// ---- (16,16) weight shuffle: one 16-byte unit per thread -----------------------------------
// tiled byte `off` of row-block t: chunk q = pos >> (cshift + 4), row nl, byte j of the chunk.
__global__ void weight_shuffle_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t units,
                                      int64_t nb, int64_t row_bytes, int cshift, int gate_up, int inverse) {
  const int64_t blk = 16 * row_bytes;
  for (int64_t u = first_index(); u < units; u += grid_stride()) {
    const int64_t off = u * 16;
    const int64_t t = off / blk, pos = off - t * blk;
    const int64_t b = t / nb, tb = t - b * nb;
    const int64_t cb = gate_up ? gu_canonical_block(tb, nb) : tb;
    const int64_t q = pos >> (cshift + 4), nl = (pos >> cshift) & 15, j = pos & ((int64_t{1} << cshift) - 1);
    const int64_t canonical = ((b * nb + cb) * 16 + nl) * row_bytes + (q << cshift) + j;
    if (inverse) {
      *reinterpret_cast<uint4*>(dst + canonical) = *reinterpret_cast<const uint4*>(src + off);
    } else {
      *reinterpret_cast<uint4*>(dst + off) = *reinterpret_cast<const uint4*>(src + canonical);
    }
  }
}

// ---- w4a16 preshuffle: one 8-byte unit (8 values of a row) per thread -------------------------
__global__ void preshuffle_int4_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t units,
                                       int64_t row_bytes, uint64_t flip, int inverse) {
  const int64_t blk = 16 * row_bytes;
  for (int64_t u = first_index(); u < units; u += grid_stride()) {
    const int64_t off = u * 8;
    const int64_t t = off / blk, pos = off - t * blk;
    const int64_t canonical = (t * 16 + ((pos >> 3) & 15)) * row_bytes + (pos >> 7) * 8;
    if (inverse) {
      const uint64_t v = *reinterpret_cast<const uint64_t*>(src + off);
      *reinterpret_cast<uint64_t*>(dst + canonical) = per8_unpack(v ^ flip);
    } else {
      const uint64_t v = *reinterpret_cast<const uint64_t*>(src + canonical);
      *reinterpret_cast<uint64_t*>(dst + off) = per8_pack(v) ^ flip;
    }
  }
}

// ---- E8M0 scales: one shuffled 32-bit word (kl, ml fixed; kp, mp vary) per thread -------------
__global__ void scale_shuffle_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t words,
                                     int64_t rows_in, int64_t rows_out, int64_t cols_in, int64_t cols_out,
                                     int gate_up, int inverse) {
  const int64_t blk = 32 * cols_out, blocks_per_expert = rows_out / 32;
  for (int64_t w = first_index(); w < words; w += grid_stride()) {
    const int64_t off = w * 4;
    const int64_t t = off / blk, pos = off - t * blk;
    const int64_t e = t / blocks_per_expert, m1 = t - e * blocks_per_expert;
    const int64_t k1 = pos >> 8;
    const int kl = static_cast<int>((pos >> 6) & 3), ml = static_cast<int>((pos >> 2) & 15);
    for (int i = 0; i < 4; ++i) {
      const int kp = i >> 1, mp = i & 1;
      const int64_t r = scale_source_row(gate_up != 0, rows_in, m1, mp * 16 + ml);
      const int64_t c = 8 * k1 + 4 * kp + kl;
      const bool valid = r < rows_in && c < cols_in;
      const int64_t at = (e * rows_in + r) * cols_in + c;
      if (inverse) {
        if (valid) dst[at] = src[off + i];
      } else {
        dst[off + i] = valid ? src[at] : 0x7F;
      }
    }
  }
}

// ---- w4a16 scales: [E, N, G] <-> [E, G/2, N, 2], one pair of elements T per thread -------------
template <typename T>
__global__ void scale_w4a16_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t pairs, int64_t n,
                                   int64_t g2, int inverse) {
  for (int64_t p = first_index(); p < pairs; p += grid_stride()) {
    // p enumerates the output: shuffled (e, j, r) forward, canonical (e, r, j) inverse
    const int64_t a = p % (inverse ? g2 : n), rest = p / (inverse ? g2 : n);
    const int64_t b = rest % (inverse ? n : g2), e = rest / (inverse ? n : g2);
    const int64_t r = inverse ? b : a, j = inverse ? a : b;
    const int64_t canonical = ((e * n + r) * g2 + j) * 2, shuffled = ((e * g2 + j) * n + r) * 2;
    const int64_t from = inverse ? shuffled : canonical, to = inverse ? canonical : shuffled;
    dst[to] = src[from];
    dst[to + 1] = src[from + 1];
  }
}

// ---- element-wise int4 helpers, one packed byte (or group of 4) per thread -------------------
__global__ void int4_to_int8_kernel(const uint8_t* __restrict__ codes, int8_t* __restrict__ out, int64_t nbytes,
                                    int off) {
  for (int64_t i = first_index(); i < nbytes; i += grid_stride()) {
    const uint8_t c = codes[i];
    out[2 * i] = static_cast<int8_t>((c & 0xF) - off);
    out[2 * i + 1] = static_cast<int8_t>((c >> 4) - off);
  }
}

__global__ void int8_to_int4_kernel(const int8_t* __restrict__ v, uint8_t* __restrict__ codes, int64_t nbytes,
                                    int off) {
  for (int64_t i = first_index(); i < nbytes; i += grid_stride()) {
    codes[i] = static_cast<uint8_t>(((v[2 * i] + off) & 0xF) | (((v[2 * i + 1] + off) & 0xF) << 4));
  }
}

__global__ void pack_int4_per8_kernel(const int8_t* __restrict__ v, uint8_t* __restrict__ out, int64_t nbytes) {
  for (int64_t i = first_index(); i < nbytes; i += grid_stride()) {
    const int64_t g = i / 4, j = i % 4;
    out[i] = static_cast<uint8_t>((v[8 * g + j] & 0xF) | ((v[8 * g + j + 4] & 0xF) << 4));
  }
}

__global__ void unpack_int4_per8_kernel(const uint8_t* __restrict__ b, int8_t* __restrict__ out, int64_t nbytes,
                                        int off) {
  for (int64_t i = first_index(); i < nbytes; i += grid_stride()) {
    const int64_t g = i / 4, j = i % 4;
    out[8 * g + j] = static_cast<int8_t>(((b[i] & 0xF) ^ off) - off);
    out[8 * g + j + 4] = static_cast<int8_t>(((b[i] >> 4) ^ off) - off);
  }
}

// ---- repack_into: one destination byte per thread, built from two source nibbles ------------
__global__ void repack_kernel(NibbleSource src, uint8_t* __restrict__ dst, int layout, int gate_up, uint64_t flip,
                              int64_t n_total, int64_t row_bytes, int64_t row_offset, int64_t n) {
  const int64_t bytes = n * row_bytes, blk = 16 * row_bytes;
  for (int64_t u = first_index(); u < bytes; u += grid_stride()) {
    int64_t r, k_lo, k_hi, at;
    if (layout == kLayoutCanonical) {
      r = u / row_bytes;
      k_lo = 2 * (u - r * row_bytes);
      k_hi = k_lo + 1;
      at = row_offset * row_bytes + u;
    } else {
      const int64_t t = u / blk, pos = u - t * blk;
      const int64_t block = row_offset / 16 + t;
      const int64_t tile = layout == kLayoutGuInterleave && gate_up ? gu_tile_block(block, n_total / 16) : block;
      at = tile * blk + pos;
      if (layout == kLayoutW4a16) {
        // 16 values (8 bytes) per chunk; byte b of a chunk holds values 8*(b/4) + b%4 and +4
        const int64_t bb = pos & 7;
        r = t * 16 + ((pos >> 3) & 15);
        k_lo = (pos >> 7) * 16 + 8 * (bb >> 2) + (bb & 3);
        k_hi = k_lo + 4;
      } else {
        r = t * 16 + ((pos >> 4) & 15);
        k_lo = 2 * ((pos >> 8) * 16 + (pos & 15));
        k_hi = k_lo + 1;
      }
    }
    const uint32_t v = fetch_nibble(src, r, k_lo) | (fetch_nibble(src, r, k_hi) << 4);
    dst[at] = static_cast<uint8_t>(v ^ (flip & 0xFF));
  }
}

}  // namespace
}  // namespace moeprep

using namespace moeprep;

extern "C" {

const char* moeprep_gpu_error_string(int error) {
  return GPU_RT(GetErrorString)(static_cast<gpu_error_t>(error));
}

int moeprep_gpu_weight_shuffle(const uint8_t* src, uint8_t* dst, int64_t batch, int64_t rows, int64_t row_bytes,
                               int64_t chunk, int gate_up, int inverse, void* stream) {
  const int64_t total = batch * rows * row_bytes, nb = rows / 16;
  return launch(total / 16, stream, weight_shuffle_kernel, src, dst, total / 16, nb, row_bytes, log2_of(chunk), gate_up,
                inverse);
}

int moeprep_gpu_preshuffle_int4(const uint8_t* src, uint8_t* dst, int64_t total_rows, int64_t row_bytes,
                                int is_signed, int inverse, void* stream) {
  const int64_t units = total_rows * row_bytes / 8;
  return launch(units, stream, preshuffle_int4_kernel, src, dst, units, row_bytes, is_signed ? kSignFlip : 0,
                inverse);
}

int moeprep_gpu_scale_shuffle(const uint8_t* src, uint8_t* dst, int64_t experts, int64_t rows_in, int64_t rows_out,
                              int64_t cols_in, int64_t cols_out, int gate_up, int inverse, void* stream) {
  const int64_t words = experts * rows_out * cols_out / 4;
  return launch(words, stream, scale_shuffle_kernel, src, dst, words, rows_in, rows_out, cols_in, cols_out, gate_up,
                inverse);
}

int moeprep_gpu_scale_w4a16(const uint8_t* src, uint8_t* dst, int64_t experts, int64_t n, int64_t groups,
                            int elem_bytes, int inverse, void* stream) {
  const int64_t pairs = experts * n * (groups / 2);
  switch (elem_bytes) {
    case 1:
      return launch(pairs, stream, scale_w4a16_kernel<uint8_t>, src, dst, pairs, n, groups / 2, inverse);
    case 2:
      return launch(pairs, stream, scale_w4a16_kernel<uint16_t>, reinterpret_cast<const uint16_t*>(src),
                    reinterpret_cast<uint16_t*>(dst), pairs, n, groups / 2, inverse);
    case 4:
      return launch(pairs, stream, scale_w4a16_kernel<uint32_t>, reinterpret_cast<const uint32_t*>(src),
                    reinterpret_cast<uint32_t*>(dst), pairs, n, groups / 2, inverse);
    case 8:
      return launch(pairs, stream, scale_w4a16_kernel<uint64_t>, reinterpret_cast<const uint64_t*>(src),
                    reinterpret_cast<uint64_t*>(dst), pairs, n, groups / 2, inverse);
    default:
      return static_cast<int>(GPU_RT(ErrorInvalidValue));
  }
}

int moeprep_gpu_int4_to_int8(const uint8_t* codes, int8_t* out, int64_t nbytes, int is_signed, void* stream) {
  return launch(nbytes, stream, int4_to_int8_kernel, codes, out, nbytes, is_signed ? 8 : 0);
}

int moeprep_gpu_int8_to_int4(const int8_t* v, uint8_t* codes, int64_t nbytes, int is_signed, void* stream) {
  return launch(nbytes, stream, int8_to_int4_kernel, v, codes, nbytes, is_signed ? 8 : 0);
}

int moeprep_gpu_pack_int4_per8(const int8_t* v, uint8_t* out, int64_t nbytes, void* stream) {
  return launch(nbytes, stream, pack_int4_per8_kernel, v, out, nbytes);
}

int moeprep_gpu_unpack_int4_per8(const uint8_t* b, int8_t* out, int64_t nbytes, int is_signed, void* stream) {
  return launch(nbytes, stream, unpack_int4_per8_kernel, b, out, nbytes, is_signed ? 8 : 0);
}

int moeprep_gpu_repack(NibbleSource src, uint8_t* dst, int layout, int gate_up, uint64_t flip, int64_t n_total,
                       int64_t row_bytes, int64_t row_offset, int64_t n, void* stream) {
  return launch(n * row_bytes, stream, repack_kernel, src, dst, layout, gate_up, flip, n_total, row_bytes, row_offset,
                n);
}

}  // extern "C"
