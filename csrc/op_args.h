// Argument checks and geometry shared by the CPU and CUDA bindings.
//
// The Python front (moeprep/ops/__init__.py) validates the user-facing contract and raises
// moeprep.errors.TargetError; the checks here only guard memory safety for direct
// torch.ops.moeprep calls, so they are terse TORCH_CHECKs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>
#include <vector>

#include <c10/util/string_view.h>

#include "common.h"

namespace moeprep {

inline const uint8_t* bytes_of(const at::Tensor& t) { return static_cast<const uint8_t*>(t.const_data_ptr()); }
inline uint8_t* bytes_of(at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

// t's shape with the last dim replaced (the int4 <-> int8 conversions halve or double it).
inline std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

// A tensor [..., N, K] seen as `batch` matrices of `rows` x `row_bytes`.
struct RowGeom {
  int64_t batch;
  int64_t rows;
  int64_t row_bytes;
};

inline RowGeom row_geometry(const at::Tensor& x, int64_t row_multiple, int64_t byte_multiple) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "moeprep: expected a contiguous tensor with >= 2 dims");
  RowGeom g{1, x.size(-2), x.size(-1) * static_cast<int64_t>(x.element_size())};
  for (int64_t d = 0; d < x.dim() - 2; ++d) g.batch *= x.size(d);
  TORCH_CHECK(g.rows % row_multiple == 0 && g.row_bytes % byte_multiple == 0,
              "moeprep: rows must be a multiple of ", row_multiple, " and row bytes of ", byte_multiple);
  return g;
}

// E8M0 scale shuffle geometry: `experts` blocks of `rows_in` source rows, each written as
// `rows_out` (>= rows_in, multiple of 32) shuffled rows of `cols_out` (>= cols_in, multiple of 8).
struct ScaleGeom {
  int64_t experts;
  int64_t rows_in;
  int64_t rows_out;
  int64_t cols_in;
  int64_t cols_out;
  bool gate_up;
};

inline ScaleGeom scale_geometry(int64_t total_rows_in, int64_t cols_in, int64_t experts, bool gate_up,
                                int64_t total_rows_out, int64_t cols_out) {
  TORCH_CHECK(experts > 0 && total_rows_in % experts == 0 && total_rows_out % experts == 0,
              "moeprep: rows must split evenly into experts");
  ScaleGeom g{experts, total_rows_in / experts, total_rows_out / experts, cols_in, cols_out, gate_up};
  TORCH_CHECK(g.rows_out % 32 == 0 && g.rows_out >= g.rows_in && g.cols_out % 8 == 0 && g.cols_out >= cols_in,
              "moeprep: bad padded scale shape");
  TORCH_CHECK(!gate_up || g.rows_in == g.rows_out, "moeprep: gate_up scale shuffle cannot pad rows");
  return g;
}

// Everything repack_into needs, resolved from its arguments.
struct RepackPlan {
  NibbleSource src;
  int layout;
  bool gate_up;
  uint64_t flip;       // kSignFlip for w4a16_signed
  uint8_t* dst;        // expert's [n_total, row_bytes] block
  int64_t n_total;
  int64_t row_bytes;   // K / 2
  int64_t row_offset;
  int64_t n;           // source (and written) rows
  bool gathers;
};

inline RepackPlan plan_repack(const at::Tensor& dst, const at::Tensor& src, c10::string_view packing,
                              c10::string_view layout, int64_t expert, int64_t row_offset, bool gate_up,
                              const std::optional<at::Tensor>& row_index,
                              const std::optional<at::Tensor>& col_index) {
  TORCH_CHECK(dst.scalar_type() == at::kByte && dst.dim() == 3 && dst.is_contiguous(),
              "moeprep: repack_into dst must be a contiguous uint8 [E, N, K/2] tensor");
  TORCH_CHECK(0 <= expert && expert < dst.size(0), "moeprep: expert out of range");
  TORCH_CHECK(src.dim() == 2 && src.stride(1) == 1 && src.device() == dst.device(),
              "moeprep: repack_into src must be 2-D, row-contiguous and on dst's device");
  RepackPlan p{};
  p.n_total = dst.size(1);
  p.row_bytes = dst.size(2);
  p.row_offset = row_offset;
  p.gate_up = gate_up;
  const int64_t k = 2 * p.row_bytes;
  const bool int32_src = packing != "canonical";
  TORCH_CHECK(src.scalar_type() == (int32_src ? at::kInt : at::kByte), "moeprep: wrong src dtype for ", packing);
  p.src.data = static_cast<const uint8_t*>(src.const_data_ptr());
  if (packing == "canonical" || packing == "ct_int32") {
    // compressed-tensors int32 words hold nibbles LSB first: little-endian bytes are canonical
    const int64_t width = packing == "canonical" ? p.row_bytes : k / 8;
    TORCH_CHECK(src.size(1) == width && (packing == "canonical" || k % 8 == 0), "moeprep: src width mismatch");
    p.src.packing = kPackCanonical;
    p.src.stride = src.stride(0) * static_cast<int64_t>(src.element_size());
    p.n = src.size(0);
  } else if (packing == "gptq_int32") {
    TORCH_CHECK(k % 8 == 0 && src.size(0) == k / 8, "moeprep: gptq src must be [K/8, n]");
    p.src.packing = kPackGptq;
    p.src.stride = src.stride(0);
    p.n = src.size(1);
  } else if (packing == "awq_int32") {
    TORCH_CHECK(src.size(0) == k, "moeprep: awq src must be [K, n/8]");
    p.src.packing = kPackAwq;
    p.src.stride = src.stride(0);
    p.n = src.size(1) * 8;
  } else {
    TORCH_CHECK(false, "moeprep: unknown src_packing ", packing);
  }
  for (const auto* idx : {&row_index, &col_index}) {
    if (idx->has_value()) {
      const at::Tensor& t = idx->value();
      TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() && t.device() == dst.device(),
                  "moeprep: index tensors must be contiguous int64 vectors on dst's device");
      TORCH_CHECK(t.size(0) == (idx == &row_index ? p.n : k), "moeprep: index length mismatch");
    }
  }
  p.src.row_index = row_index.has_value() ? row_index->const_data_ptr<int64_t>() : nullptr;
  p.src.col_index = col_index.has_value() ? col_index->const_data_ptr<int64_t>() : nullptr;
  p.gathers = row_index.has_value() || col_index.has_value();

  int64_t row_multiple = kTileRows, byte_multiple = 16;
  if (layout == "canonical") {
    p.layout = kLayoutCanonical;
    row_multiple = byte_multiple = 1;
  } else if (layout == "shuffle") {
    p.layout = kLayoutShuffle;
    byte_multiple = 32;
  } else if (layout == "guinterleave") {
    p.layout = kLayoutGuInterleave;
    byte_multiple = 64;
    TORCH_CHECK(p.n_total % (gate_up ? 32 : 16) == 0, "moeprep: guinterleave dst rows not tileable");
  } else if (layout == "w4a16_signed" || layout == "w4a16_unsigned") {
    p.layout = kLayoutW4a16;
    p.flip = layout == "w4a16_signed" ? kSignFlip : 0;
  } else {
    TORCH_CHECK(false, "moeprep: unknown layout ", layout);
  }
  TORCH_CHECK(row_offset >= 0 && row_offset + p.n <= p.n_total, "moeprep: rows out of range");
  TORCH_CHECK(row_offset % row_multiple == 0 && p.n % row_multiple == 0 && p.row_bytes % byte_multiple == 0,
              "moeprep: repack window not tileable");
  p.dst = static_cast<uint8_t*>(dst.data_ptr()) + expert * p.n_total * p.row_bytes;
  return p;
}

// Position of canonical row-block `block` (of the expert) in a tiled layout.
inline int64_t repack_tile_block(const RepackPlan& p, int64_t block) {
  return p.layout == kLayoutGuInterleave && p.gate_up ? gu_tile_block(block, p.n_total / kTileRows) : block;
}

}  // namespace moeprep
