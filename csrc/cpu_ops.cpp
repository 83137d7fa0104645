// moeprep._C: the op schemas (TORCH_LIBRARY moeprep) and their CPU implementations.
//
// Each driver splits the tensor into independent row-blocks and runs the kernels of
// cpu_kernels.h over them with at::parallel_for, so every thread writes one contiguous
// range of the output.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "kernel_constants.h"
#include "op_args.h"

namespace moeprep {
namespace {

// Splits [0, n) into contiguous ranges of at least ~256 KiB of work.
template <typename F>
void parallel_ranges(int64_t n, int64_t item_bytes, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, item_bytes));
  at::parallel_for(0, n, grain, f);
}

// A fresh output is written once, entirely, so the page faults of its first touch cost as much as
// the copy itself: transparent huge pages (where the kernel allows them) make 512x fewer faults.
at::Tensor fresh_output(at::Tensor out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr()), end = (p + out.nbytes()) & ~(kHuge - 1);
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  if (out.nbytes() >= 4 * kHuge && end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // best effort: ignore failure
  }
#endif
  return out;
}

// The 16 row pointers of row-block `block` of a matrix with `row_bytes` per row.
template <typename P>
void block_rows(P base, int64_t block, int64_t row_bytes, P* rows) {
  for (int i = 0; i < kTileRows; ++i) rows[i] = base + (block * kTileRows + i) * row_bytes;
}

// ---------------------------------------------------------------------------------------------
at::Tensor weight_shuffle_cpu(const at::Tensor& x, int64_t chunk, bool gate_up, bool inverse) {
  TORCH_CHECK(chunk > 0 && chunk % 16 == 0, "moeprep: chunk must be a positive multiple of 16");
  const RowGeom g = row_geometry(x, gate_up ? 2 * kTileRows : kTileRows, chunk);
  at::Tensor out = fresh_output(at::empty_like(x, at::MemoryFormat::Contiguous));
  const int64_t nb = g.rows / kTileRows, blk = kTileRows * g.row_bytes;
  const uint8_t* in = bytes_of(x);
  uint8_t* o = bytes_of(out);
  parallel_ranges(g.batch * nb, blk, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nb, tb = t % nb;
      const int64_t cb = gate_up ? gu_canonical_block(tb, nb) : tb;
      if (inverse) {
        uint8_t* rows[kTileRows];
        block_rows(o + b * nb * blk, cb, g.row_bytes, rows);
        cpu::tiles_to_rows(in + t * blk, rows, g.row_bytes, chunk);
      } else {
        const uint8_t* rows[kTileRows];
        block_rows(in + b * nb * blk, cb, g.row_bytes, rows);
        cpu::rows_to_tiles(rows, o + t * blk, g.row_bytes, chunk);
      }
    }
  });
  return out;
}

at::Tensor preshuffle_int4_cpu(const at::Tensor& x, bool is_signed, bool inverse) {
  TORCH_CHECK(x.scalar_type() == at::kByte, "moeprep: preshuffle_int4 expects uint8 codes");
  const RowGeom g = row_geometry(x, kTileRows, 16);
  at::Tensor out = fresh_output(at::empty_like(x, at::MemoryFormat::Contiguous));
  const int64_t blk = kTileRows * g.row_bytes;
  const uint64_t flip = is_signed ? kSignFlip : 0;
  const uint8_t* in = bytes_of(x);
  uint8_t* o = bytes_of(out);
  parallel_ranges(g.batch * g.rows / kTileRows, blk, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (inverse) {
        uint8_t* rows[kTileRows];
        block_rows(o, t, g.row_bytes, rows);
        cpu::w4a16_to_codes(in + t * blk, rows, g.row_bytes, flip);
      } else {
        const uint8_t* rows[kTileRows];
        block_rows(in, t, g.row_bytes, rows);
        cpu::codes_to_w4a16(rows, o + t * blk, g.row_bytes, flip);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// E8M0 scales, 32-row blocks of 8-column groups. Pad rows read from a row of 0x7F; the last,
// partial group (and any group of pure padding) goes through a 32x8 scratch tile.
constexpr uint8_t kScalePad = 0x7F;

at::Tensor scale_shuffle_cpu(const at::Tensor& s, int64_t experts, bool gate_up, int64_t rows_out,
                             int64_t cols_out) {
  TORCH_CHECK(s.dim() == 2 && s.element_size() == 1 && s.is_contiguous(), "moeprep: scales must be contiguous 2-D bytes");
  const ScaleGeom g = scale_geometry(s.size(0), s.size(1), experts, gate_up, rows_out, cols_out);
  at::Tensor out = fresh_output(at::empty({rows_out, cols_out}, s.options()));
  const std::vector<uint8_t> pad(cols_out, kScalePad);
  const uint8_t* in = bytes_of(s);
  uint8_t* o = bytes_of(out);
  const int64_t nm = g.rows_out / 32, full = g.cols_in / 8;
  parallel_ranges(experts * nm, 32 * cols_out, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / nm, m1 = t % nm;
      const uint8_t* rows[32];
      for (int i = 0; i < 32; ++i) {
        const int64_t r = scale_source_row(g.gate_up, g.rows_in, m1, i);
        rows[i] = r < g.rows_in ? in + (e * g.rows_in + r) * g.cols_in : pad.data();
      }
      uint8_t* dst = o + (e * g.rows_out + m1 * 32) * cols_out;
      for (int64_t k1 = 0; k1 < full; ++k1) cpu::scale_group_fwd(rows, 8 * k1, dst + 256 * k1);
      for (int64_t k1 = full; k1 < cols_out / 8; ++k1) {
        uint8_t tile[32][8];
        const uint8_t* tile_rows[32];
        const int64_t valid = std::max<int64_t>(0, g.cols_in - 8 * k1);
        std::memset(tile, kScalePad, sizeof(tile));
        for (int i = 0; i < 32; ++i) {
          if (rows[i] != pad.data()) std::memcpy(tile[i], rows[i] + 8 * k1, valid);
          tile_rows[i] = tile[i];
        }
        cpu::scale_group_fwd_scalar(tile_rows, 0, dst + 256 * k1);
      }
    }
  });
  return out;
}

at::Tensor scale_unshuffle_cpu(const at::Tensor& y, int64_t experts, bool gate_up, int64_t rows, int64_t cols) {
  TORCH_CHECK(y.dim() == 2 && y.element_size() == 1 && y.is_contiguous(), "moeprep: scales must be contiguous 2-D bytes");
  const ScaleGeom g = scale_geometry(rows, cols, experts, gate_up, y.size(0), y.size(1));
  at::Tensor out = fresh_output(at::empty({rows, cols}, y.options()));
  const uint8_t* in = bytes_of(y);
  uint8_t* o = bytes_of(out);
  const int64_t nm = g.rows_out / 32, full = cols / 8;
  parallel_ranges(experts * nm, 32 * g.cols_out, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> sink(g.cols_out);  // receives the pad rows
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / nm, m1 = t % nm;
      uint8_t* dst_rows[32];
      for (int i = 0; i < 32; ++i) {
        const int64_t r = scale_source_row(g.gate_up, g.rows_in, m1, i);
        dst_rows[i] = r < g.rows_in ? o + (e * g.rows_in + r) * cols : sink.data();
      }
      const uint8_t* src = in + (e * g.rows_out + m1 * 32) * g.cols_out;
      for (int64_t k1 = 0; k1 < full; ++k1) cpu::scale_group_inv(src + 256 * k1, dst_rows, 8 * k1);
      if (cols % 8) {
        uint8_t tile[32][8];
        uint8_t* tile_rows[32];
        for (int i = 0; i < 32; ++i) tile_rows[i] = tile[i];
        cpu::scale_group_inv_scalar(src + 256 * full, tile_rows, 0);
        for (int i = 0; i < 32; ++i) std::memcpy(dst_rows[i] + 8 * full, tile[i], cols % 8);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// w4a16 scales / zero points: canonical [E, N, G] <-> [E, G/2, N, 2] (pairs of groups per column).
template <int kPairBytes>
void scale_w4a16_loop(const uint8_t* in, uint8_t* out, int64_t experts, int64_t n, int64_t g2, bool inverse) {
  const int64_t ntiles = (n + kTileRows - 1) / kTileRows;
  parallel_ranges(experts * ntiles, kTileRows * g2 * kPairBytes, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / ntiles, n0 = (t % ntiles) * kTileRows, n1 = std::min(n, n0 + kTileRows);
      for (int64_t j = 0; j < g2; ++j) {
        for (int64_t r = n0; r < n1; ++r) {
          const int64_t canonical = ((e * n + r) * g2 + j) * kPairBytes;
          const int64_t shuffled = ((e * g2 + j) * n + r) * kPairBytes;
          if (inverse) {
            std::memcpy(out + canonical, in + shuffled, kPairBytes);
          } else {
            std::memcpy(out + shuffled, in + canonical, kPairBytes);
          }
        }
      }
    }
  });
}

at::Tensor scale_w4a16_cpu(const at::Tensor& s, bool inverse) {
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous(), "moeprep: w4a16 scales must be contiguous 3-D");
  const int64_t experts = s.size(0), n = inverse ? s.size(2) : s.size(1), g = inverse ? s.size(1) : s.size(2);
  TORCH_CHECK(g % 2 == 0, "moeprep: w4a16 scales need an even number of groups");
  at::Tensor out = fresh_output(at::empty(inverse ? at::IntArrayRef{experts, n, g} : at::IntArrayRef{experts, g, n}, s.options()));
  const uint8_t* in = bytes_of(s);
  uint8_t* o = bytes_of(out);
  switch (s.element_size()) {
    case 1: scale_w4a16_loop<2>(in, o, experts, n, g / 2, inverse); break;
    case 2: scale_w4a16_loop<4>(in, o, experts, n, g / 2, inverse); break;
    case 4: scale_w4a16_loop<8>(in, o, experts, n, g / 2, inverse); break;
    case 8: scale_w4a16_loop<16>(in, o, experts, n, g / 2, inverse); break;
    default: TORCH_CHECK(false, "moeprep: unsupported element size ", s.element_size());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Element-wise int4 helpers, parallel over contiguous byte ranges of the packed side.
template <typename F>
void parallel_bytes(int64_t nbytes, int64_t multiple, const F& f) {
  parallel_ranges(nbytes / multiple, multiple, [&](int64_t begin, int64_t end) {
    f(begin * multiple, (end - begin) * multiple);
  });
}

at::Tensor int4_to_int8_cpu(const at::Tensor& codes, bool is_signed) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() >= 1 && codes.is_contiguous(), "moeprep: expected uint8 codes");
  at::Tensor out = fresh_output(at::empty(with_last_dim(codes, 2 * codes.size(-1)), codes.options().dtype(at::kChar)));
  const uint8_t* in = bytes_of(codes);
  int8_t* o = out.data_ptr<int8_t>();
  parallel_bytes(codes.numel(), 1, [&](int64_t off, int64_t len) { cpu::int4_to_int8(in + off, o + 2 * off, len, is_signed); });
  return out;
}

at::Tensor int8_to_int4_cpu(const at::Tensor& v, bool is_signed) {
  TORCH_CHECK(v.scalar_type() == at::kChar && v.dim() >= 1 && v.is_contiguous() && v.size(-1) % 2 == 0,
              "moeprep: expected int8 values, even last dim");
  at::Tensor out = fresh_output(at::empty(with_last_dim(v, v.size(-1) / 2), v.options().dtype(at::kByte)));
  const int8_t* in = v.const_data_ptr<int8_t>();
  uint8_t* o = bytes_of(out);
  parallel_bytes(out.numel(), 1, [&](int64_t off, int64_t len) { cpu::int8_to_int4(in + 2 * off, o + off, len, is_signed); });
  return out;
}

at::Tensor pack_int4_per8_cpu(const at::Tensor& v) {
  TORCH_CHECK(v.scalar_type() == at::kChar && v.dim() >= 1 && v.is_contiguous() && v.size(-1) % 8 == 0,
              "moeprep: expected int8 values, last dim a multiple of 8");
  at::Tensor out = fresh_output(at::empty(with_last_dim(v, v.size(-1) / 2), v.options().dtype(at::kByte)));
  const int8_t* in = v.const_data_ptr<int8_t>();
  uint8_t* o = bytes_of(out);
  parallel_bytes(out.numel(), 4, [&](int64_t off, int64_t len) { cpu::pack_int4_per8(in + 2 * off, o + off, len / 4); });
  return out;
}

at::Tensor unpack_int4_per8_cpu(const at::Tensor& b, bool is_signed) {
  TORCH_CHECK(b.scalar_type() == at::kByte && b.dim() >= 1 && b.is_contiguous() && b.size(-1) % 4 == 0,
              "moeprep: expected uint8 bytes, last dim a multiple of 4");
  at::Tensor out = fresh_output(at::empty(with_last_dim(b, 2 * b.size(-1)), b.options().dtype(at::kChar)));
  const uint8_t* in = bytes_of(b);
  int8_t* o = out.data_ptr<int8_t>();
  parallel_bytes(b.numel(), 4, [&](int64_t off, int64_t len) { cpu::unpack_int4_per8(in + off, o + 2 * off, len / 4, is_signed); });
  return out;
}

// ---------------------------------------------------------------------------------------------
// repack_into, three paths by source:
// - canonical / compressed-tensors bytes (no column gather): rows read in place, tiles written;
// - GPTQ / AWQ words: decoded in registers and written once (BlockWriter), 8 row-blocks side by
//   side so that every source cache line is used whole;
// - with gathers (GPTQ desc_act): nibble by nibble into an L1 buffer, then the tile writers.

void emit_rows(const RepackPlan& p, const uint8_t* const* rows, int nrows, int64_t r0, int64_t kb0, int64_t kb1) {
  const int64_t row = p.row_offset + r0;
  if (p.layout == kLayoutCanonical) {
    for (int i = 0; i < nrows; ++i) std::memcpy(p.dst + (row + i) * p.row_bytes + kb0, rows[i], kb1 - kb0);
    return;
  }
  uint8_t* out = p.dst + repack_tile_block(p, row / kTileRows) * kTileRows * p.row_bytes + kTileRows * kb0;
  if (p.layout == kLayoutW4a16) {
    cpu::codes_to_w4a16(rows, out, kb1 - kb0, p.flip);
  } else {
    cpu::rows_to_tiles(rows, out, kb1 - kb0, 16);
  }
}

void repack_rows_in_place(const RepackPlan& p) {
  parallel_ranges((p.n + kTileRows - 1) / kTileRows, kTileRows * p.row_bytes, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kTileRows;
      const int nrows = static_cast<int>(std::min<int64_t>(kTileRows, p.n - r0));
      const uint8_t* rows[kTileRows];
      for (int i = 0; i < nrows; ++i) {
        const int64_t r = p.src.row_index ? p.src.row_index[r0 + i] : r0 + i;
        rows[i] = p.src.data + r * p.src.stride;
      }
      emit_rows(p, rows, nrows, r0, 0, p.row_bytes);
    }
  });
}

constexpr int64_t kDecodeChunk = 2048;  // canonical bytes per row and step: 16 rows = 32 KiB

void repack_decoded(const RepackPlan& p) {
  parallel_ranges((p.n + kTileRows - 1) / kTileRows, kTileRows * p.row_bytes, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf(kTileRows * kDecodeChunk);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kTileRows;
      const int nrows = static_cast<int>(std::min<int64_t>(kTileRows, p.n - r0));
      const uint8_t* rows[kTileRows];
      for (int i = 0; i < nrows; ++i) rows[i] = buf.data() + i * kDecodeChunk;
      for (int64_t kb0 = 0; kb0 < p.row_bytes; kb0 += kDecodeChunk) {
        const int64_t kb1 = std::min(p.row_bytes, kb0 + kDecodeChunk);
        cpu::decode_generic(p.src, r0, nrows, kb0, kb1, buf.data(), kDecodeChunk);
        emit_rows(p, rows, nrows, r0, kb0, kb1);
      }
    }
  });
}

// Writer for the 16-row block whose first source row is r0.
template <int L>
cpu::BlockWriter<L> block_writer(const RepackPlan& p, int64_t r0) {
  const int64_t row = p.row_offset + r0;
  if constexpr (L == kLayoutCanonical) {
    return {p.dst + row * p.row_bytes, p.row_bytes, 0};
  } else {
    return {p.dst + repack_tile_block(p, row / kTileRows) * kTileRows * p.row_bytes, 0, p.flip};
  }
}

template <int L, bool kAwq>
void repack_words(const RepackPlan& p) {
  constexpr int64_t kPanel = 8;                 // row-blocks side by side
  constexpr int64_t kStep = kAwq ? 8 : 16;      // canonical bytes per step
  const int64_t blocks = p.n / kTileRows, kb_end = p.row_bytes / kStep * kStep, st = p.src.stride;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(p.src.data);
  parallel_ranges((blocks + kPanel - 1) / kPanel, kPanel * kTileRows * p.row_bytes, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t b0 = panel * kPanel, nb = std::min(kPanel, blocks - b0);
      cpu::BlockWriter<L> out[kPanel];
      for (int64_t j = 0; j < nb; ++j) out[j] = block_writer<L>(p, (b0 + j) * kTileRows);
      for (int64_t kb = 0; kb < kb_end; kb += kStep) {
        if constexpr (kAwq) {
          const int64_t ahead = std::min(kb + 4 * kStep, kb_end - kStep);
          for (int i = 0; i < 16; ++i) __builtin_prefetch(words + (2 * ahead + i) * st + b0 * 2);
        }
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t r0 = (b0 + j) * kTileRows;
#if defined(__SSE2__)
          if constexpr (kAwq) {
            cpu::awq_step(words + 2 * kb * st + r0 / 8, st, kb, out[j]);
            continue;
          }
#endif
          cpu::gptq_step(words + kb / 4 * st + r0, st, kb, out[j]);
        }
      }
    }
  });
  if constexpr (L == kLayoutCanonical) {
    // what the steps leave: bytes past the last whole step, rows past the last whole block
    const int64_t rows = blocks * kTileRows;
    uint8_t* d = p.dst + p.row_offset * p.row_bytes;
    cpu::decode_generic(p.src, 0, static_cast<int>(rows), kb_end, p.row_bytes, d + kb_end, p.row_bytes);
    cpu::decode_generic(p.src, rows, static_cast<int>(p.n - rows), 0, p.row_bytes, d + rows * p.row_bytes, p.row_bytes);
  }
}

template <bool kAwq>
void repack_words_any_layout(const RepackPlan& p) {
  if (p.layout == kLayoutCanonical) {
    repack_words<kLayoutCanonical, kAwq>(p);
  } else if (p.layout == kLayoutW4a16) {
    repack_words<kLayoutW4a16, kAwq>(p);
  } else {
    repack_words<kLayoutShuffle, kAwq>(p);  // guinterleave is the byte shuffle, blocks reordered
  }
}

void repack_into_cpu(const at::Tensor& dst, const at::Tensor& src, c10::string_view packing,
                     c10::string_view layout, int64_t expert, int64_t row_offset, bool gate_up,
                     const std::optional<at::Tensor>& row_index, const std::optional<at::Tensor>& col_index) {
  const RepackPlan p = plan_repack(dst, src, packing, layout, expert, row_offset, gate_up, row_index, col_index);
  if (p.src.packing == kPackCanonical && p.src.col_index == nullptr) {
    repack_rows_in_place(p);
  } else if (p.gathers) {
    repack_decoded(p);
  } else if (p.src.packing == kPackGptq) {
    repack_words_any_layout<false>(p);
  } else {
#if defined(__SSE2__)
    repack_words_any_layout<true>(p);
#else
    repack_decoded(p);
#endif
  }
}

std::string kernel_constants() {
  std::string text;
#define MOEPREP_APPEND(name, value) text += std::string(#name "=") + std::to_string(value) + ";";
  MOEPREP_KERNEL_CONSTANTS(MOEPREP_APPEND)
#undef MOEPREP_APPEND
  return text;
}

}  // namespace

TORCH_LIBRARY(moeprep, m) {
  m.def("kernel_constants() -> str", &kernel_constants);
  m.def("weight_shuffle(Tensor x, int chunk_bytes, bool gate_up, bool inverse) -> Tensor");
  m.def("preshuffle_int4(Tensor codes, bool is_signed, bool inverse) -> Tensor");
  m.def("scale_shuffle(Tensor s, int experts, bool gate_up, int rows_out, int cols_out) -> Tensor");
  m.def("scale_unshuffle(Tensor y, int experts, bool gate_up, int rows, int cols) -> Tensor");
  m.def("scale_w4a16(Tensor s, bool inverse) -> Tensor");
  m.def("int4_to_int8(Tensor codes, bool is_signed) -> Tensor");
  m.def("int8_to_int4(Tensor v, bool is_signed) -> Tensor");
  m.def("pack_int4_per8(Tensor v) -> Tensor");
  m.def("unpack_int4_per8(Tensor b, bool is_signed) -> Tensor");
  m.def(
      "repack_into(Tensor(a!) dst, Tensor src, str src_packing, str layout, int expert, int row_offset, "
      "bool gate_up, Tensor? row_index, Tensor? col_index) -> ()");
}

TORCH_LIBRARY_IMPL(moeprep, CPU, m) {
  m.impl("weight_shuffle", &weight_shuffle_cpu);
  m.impl("preshuffle_int4", &preshuffle_int4_cpu);
  m.impl("scale_shuffle", &scale_shuffle_cpu);
  m.impl("scale_unshuffle", &scale_unshuffle_cpu);
  m.impl("scale_w4a16", &scale_w4a16_cpu);
  m.impl("int4_to_int8", &int4_to_int8_cpu);
  m.impl("int8_to_int4", &int8_to_int4_cpu);
  m.impl("pack_int4_per8", &pack_int4_per8_cpu);
  m.impl("unpack_int4_per8", &unpack_int4_per8_cpu);
  m.impl("repack_into", &repack_into_cpu);
}

}  // namespace moeprep

// An importable, otherwise empty module: importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
