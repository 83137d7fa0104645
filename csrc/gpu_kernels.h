// C interface of the GPU kernels (gpu_kernels.cu). Plain pointers, sizes and a stream, no torch:
// the kernel file builds with nvcc (CUDA) or hipcc (HIP) on its own. Every launcher returns 0 or
// the runtime's error code; moeprep_gpu_error_string turns that into text.
#pragma once

#include <stdint.h>

#include "common.h"

extern "C" {

// stream: a cudaStream_t / hipStream_t
const char* moeprep_gpu_error_string(int error);

// (16,16) shuffle of `batch` matrices [rows, row_bytes] moving `chunk`-byte runs (multiple of 16);
// gate_up alternates the gate and up row-blocks of each matrix; inverse undoes it.
int moeprep_gpu_weight_shuffle(const uint8_t* src, uint8_t* dst, int64_t batch, int64_t rows, int64_t row_bytes,
                               int64_t chunk, int gate_up, int inverse, void* stream);

// w4a16 preshuffle of canonical codes [batch*rows, row_bytes] (rows % 16 == 0, row_bytes % 16 == 0).
int moeprep_gpu_preshuffle_int4(const uint8_t* src, uint8_t* dst, int64_t total_rows, int64_t row_bytes,
                                int is_signed, int inverse, void* stream);

// E8M0 scale shuffle, forward (src [experts*rows_in, cols_in] -> dst [experts*rows_out, cols_out],
// padding 0x7F) or inverse (src shuffled -> dst unpadded).
int moeprep_gpu_scale_shuffle(const uint8_t* src, uint8_t* dst, int64_t experts, int64_t rows_in, int64_t rows_out,
                              int64_t cols_in, int64_t cols_out, int gate_up, int inverse, void* stream);

// [E, N, G] <-> [E, G/2, N, 2] for elements of elem_bytes (1, 2, 4 or 8).
int moeprep_gpu_scale_w4a16(const uint8_t* src, uint8_t* dst, int64_t experts, int64_t n, int64_t groups,
                            int elem_bytes, int inverse, void* stream);

// Element-wise int4 helpers; nbytes counts the packed (4-bit) side.
int moeprep_gpu_int4_to_int8(const uint8_t* codes, int8_t* out, int64_t nbytes, int is_signed, void* stream);
int moeprep_gpu_int8_to_int4(const int8_t* v, uint8_t* codes, int64_t nbytes, int is_signed, void* stream);
int moeprep_gpu_pack_int4_per8(const int8_t* v, uint8_t* out, int64_t nbytes, void* stream);
int moeprep_gpu_unpack_int4_per8(const uint8_t* b, int8_t* out, int64_t nbytes, int is_signed, void* stream);

// repack_into: writes source rows [0, n) as logical rows [row_offset, row_offset + n) of the
// expert block dst [n_total, row_bytes] in `layout` (a RepackLayout); flip = kSignFlip or 0.
int moeprep_gpu_repack(moeprep::NibbleSource src, uint8_t* dst, int layout, int gate_up, uint64_t flip,
                       int64_t n_total, int64_t row_bytes, int64_t row_offset, int64_t n, void* stream);

}  // extern "C"
