// moeprep._C_cuda: CUDA implementations of the moeprep ops (schemas are defined in cpu_ops.cpp,
// so moeprep._C must be imported first). Thin: checks, output allocation, one kernel launch on
// the current stream (gpu_kernels.cu).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gpu_kernels.h"
#include "gpu_ops.h"
#include "op_args.h"

namespace moeprep {

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, "moeprep: CUDA kernel ", op, " failed: ", moeprep_gpu_error_string(error));
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

namespace {

// The kernels move 16-byte (or 8-byte) units: give them 16-byte aligned inputs.
at::Tensor aligned(const at::Tensor& x) {
  return reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 ? x : x.clone(at::MemoryFormat::Contiguous);
}

at::Tensor weight_shuffle_cuda(const at::Tensor& x_, int64_t chunk, bool gate_up, bool inverse) {
  TORCH_CHECK(chunk > 0 && (chunk & (chunk - 1)) == 0 && chunk % 16 == 0, "moeprep: chunk must be a power of two >= 16");
  const RowGeom g = row_geometry(x_, gate_up ? 2 * kTileRows : kTileRows, chunk);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = aligned(x_);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  check_launch(moeprep_gpu_weight_shuffle(bytes_of(x), bytes_of(out), g.batch, g.rows, g.row_bytes, chunk, gate_up,
                                          inverse, stream()),
               "weight_shuffle");
  return out;
}

at::Tensor preshuffle_int4_cuda(const at::Tensor& x_, bool is_signed, bool inverse) {
  TORCH_CHECK(x_.scalar_type() == at::kByte, "moeprep: preshuffle_int4 expects uint8 codes");
  const RowGeom g = row_geometry(x_, kTileRows, 16);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = aligned(x_);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  check_launch(moeprep_gpu_preshuffle_int4(bytes_of(x), bytes_of(out), g.batch * g.rows, g.row_bytes, is_signed, inverse,
                                           stream()),
               "preshuffle_int4");
  return out;
}

at::Tensor scale_shuffle_cuda(const at::Tensor& s, int64_t experts, bool gate_up, int64_t rows_out, int64_t cols_out) {
  TORCH_CHECK(s.dim() == 2 && s.element_size() == 1 && s.is_contiguous(), "moeprep: scales must be contiguous 2-D bytes");
  const ScaleGeom g = scale_geometry(s.size(0), s.size(1), experts, gate_up, rows_out, cols_out);
  const c10::cuda::CUDAGuard guard(s.device());
  at::Tensor out = at::empty({rows_out, cols_out}, s.options());
  check_launch(moeprep_gpu_scale_shuffle(bytes_of(s), bytes_of(out), experts, g.rows_in, g.rows_out, g.cols_in,
                                         g.cols_out, gate_up, false, stream()),
               "scale_shuffle");
  return out;
}

at::Tensor scale_unshuffle_cuda(const at::Tensor& y, int64_t experts, bool gate_up, int64_t rows, int64_t cols) {
  TORCH_CHECK(y.dim() == 2 && y.element_size() == 1 && y.is_contiguous(), "moeprep: scales must be contiguous 2-D bytes");
  const ScaleGeom g = scale_geometry(rows, cols, experts, gate_up, y.size(0), y.size(1));
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty({rows, cols}, y.options());
  check_launch(moeprep_gpu_scale_shuffle(bytes_of(y), bytes_of(out), experts, g.rows_in, g.rows_out, g.cols_in,
                                         g.cols_out, gate_up, true, stream()),
               "scale_unshuffle");
  return out;
}

at::Tensor scale_w4a16_cuda(const at::Tensor& s, bool inverse) {
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous(), "moeprep: w4a16 scales must be contiguous 3-D");
  const int64_t experts = s.size(0), n = inverse ? s.size(2) : s.size(1), g = inverse ? s.size(1) : s.size(2);
  TORCH_CHECK(g % 2 == 0, "moeprep: w4a16 scales need an even number of groups");
  const c10::cuda::CUDAGuard guard(s.device());
  at::Tensor out = at::empty(inverse ? at::IntArrayRef{experts, n, g} : at::IntArrayRef{experts, g, n}, s.options());
  check_launch(moeprep_gpu_scale_w4a16(bytes_of(s), bytes_of(out), experts, n, g, static_cast<int>(s.element_size()),
                                       inverse, stream()),
               "scale_w4a16");
  return out;
}

at::Tensor int4_to_int8_cuda(const at::Tensor& codes, bool is_signed) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() >= 1 && codes.is_contiguous(), "moeprep: expected uint8 codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(with_last_dim(codes, 2 * codes.size(-1)), codes.options().dtype(at::kChar));
  check_launch(moeprep_gpu_int4_to_int8(bytes_of(codes), out.data_ptr<int8_t>(), codes.numel(), is_signed, stream()),
               "int4_to_int8");
  return out;
}

at::Tensor int8_to_int4_cuda(const at::Tensor& v, bool is_signed) {
  TORCH_CHECK(v.scalar_type() == at::kChar && v.dim() >= 1 && v.is_contiguous() && v.size(-1) % 2 == 0,
              "moeprep: expected int8 values, even last dim");
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor out = at::empty(with_last_dim(v, v.size(-1) / 2), v.options().dtype(at::kByte));
  check_launch(moeprep_gpu_int8_to_int4(v.const_data_ptr<int8_t>(), bytes_of(out), out.numel(), is_signed, stream()),
               "int8_to_int4");
  return out;
}

at::Tensor pack_int4_per8_cuda(const at::Tensor& v) {
  TORCH_CHECK(v.scalar_type() == at::kChar && v.dim() >= 1 && v.is_contiguous() && v.size(-1) % 8 == 0,
              "moeprep: expected int8 values, last dim a multiple of 8");
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor out = at::empty(with_last_dim(v, v.size(-1) / 2), v.options().dtype(at::kByte));
  check_launch(moeprep_gpu_pack_int4_per8(v.const_data_ptr<int8_t>(), bytes_of(out), out.numel(), stream()),
               "pack_int4_per8");
  return out;
}

at::Tensor unpack_int4_per8_cuda(const at::Tensor& b, bool is_signed) {
  TORCH_CHECK(b.scalar_type() == at::kByte && b.dim() >= 1 && b.is_contiguous() && b.size(-1) % 4 == 0,
              "moeprep: expected uint8 bytes, last dim a multiple of 4");
  const c10::cuda::CUDAGuard guard(b.device());
  at::Tensor out = at::empty(with_last_dim(b, 2 * b.size(-1)), b.options().dtype(at::kChar));
  check_launch(moeprep_gpu_unpack_int4_per8(bytes_of(b), out.data_ptr<int8_t>(), b.numel(), is_signed, stream()),
               "unpack_int4_per8");
  return out;
}

void repack_into_cuda(const at::Tensor& dst, const at::Tensor& src, c10::string_view packing, c10::string_view layout,
                      int64_t expert, int64_t row_offset, bool gate_up, const std::optional<at::Tensor>& row_index,
                      const std::optional<at::Tensor>& col_index) {
  const RepackPlan p =
      plan_repack(dst, src, packing, layout, expert, row_offset, gate_up, row_index, col_index);
  const c10::cuda::CUDAGuard guard(dst.device());
  check_launch(moeprep_gpu_repack(p.src, p.dst, p.layout, p.gate_up, p.flip, p.n_total, p.row_bytes, p.row_offset,
                                  p.n, stream()),
               "repack_into");
}

}  // namespace

TORCH_LIBRARY_IMPL(moeprep, CUDA, m) {
  m.impl("weight_shuffle", &weight_shuffle_cuda);
  m.impl("preshuffle_int4", &preshuffle_int4_cuda);
  m.impl("scale_shuffle", &scale_shuffle_cuda);
  m.impl("scale_unshuffle", &scale_unshuffle_cuda);
  m.impl("scale_w4a16", &scale_w4a16_cuda);
  m.impl("int4_to_int8", &int4_to_int8_cuda);
  m.impl("int8_to_int4", &int8_to_int4_cuda);
  m.impl("pack_int4_per8", &pack_int4_per8_cuda);
  m.impl("unpack_int4_per8", &unpack_int4_per8_cuda);
  m.impl("repack_into", &repack_into_cuda);
}

}  // namespace moeprep

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
