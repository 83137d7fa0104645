// Numbers the CUDA MoE GEMMs and their Python launchers share. They are written here only: the
// kernels include this header, and Python reads them from the compiled module
// (torch.ops.moeprep.kernel_constants, see moeprep/ops).
#pragma once

namespace moeprep {

constexpr int kDecodeWindow = 64;       // k per warp step of the decode GEMMs: two groups of 32 at most
constexpr int kDecodeBlocks = 4;        // 16-row weight blocks per decode warp
constexpr int kDecodeBlockM = 8;        // routed rows per block of the decode GEMMs: the mma.sync N
constexpr int kDecodeWarpsPerSm = 20;   // decode warps an SM holds (registers and rings): launch bounds
constexpr int kPrefillBlockM = 256;     // routed rows per block of the prefill GEMMs: the wgmma N
constexpr int kPrefillTileN = 128;      // weight rows per prefill CTA; K must be a multiple of it too

// name=value pairs, for Python
#define MOEPREP_KERNEL_CONSTANTS(X)                                                                       \
  X(decode_window, kDecodeWindow)                                                                        \
  X(decode_blocks, kDecodeBlocks)                                                                        \
  X(decode_block_m, kDecodeBlockM)                                                                       \
  X(decode_warps_per_sm, kDecodeWarpsPerSm)                                                              \
  X(prefill_block_m, kPrefillBlockM)                                                                     \
  X(prefill_tile_n, kPrefillTileN)

}  // namespace moeprep
