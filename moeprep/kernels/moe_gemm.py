"""The two grouped GEMMs of a MoE layer, reading the stored 4-bit layouts directly.

Each program takes one block of ``block_m`` (token, slot) rows of one expert (see routing.py)
and a tile of output columns; weights are loaded as int32 words of 8 codes and dequantized in
registers right before ``tl.dot``, never written anywhere. With ``SWAP`` the product is computed
transposed, the decoded tile being the MMA's first operand (see :func:`_product`).

* :func:`w13_kernel`: ``h = act(x W_gate^T + b_gate, x W_up^T + b_up)`` into ``h[t * k + j]``,
  with desc_act's input permutation applied on the activation loads. Gate and up rows form one
  stacked tile and one accumulator, split for the activation. It also zeroes the final output,
  which the second kernel then adds into. Optionally split along K (decode: a few experts' rows
  make few programs, each walking all of K): each split stores its fp32 partial product, and the
  last split of a tile to arrive sums them, in split order, and finishes the tile.
* :func:`w2_kernel`: ``out[t] += weight[t, j] * (h[t * k + j] W_down^T + b_down)``, optionally
  split along K; partial sums go straight into the output with atomic adds.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import mxfp4, w4a16
from ._triton import accumulate, mma, opaque, rounded

# stored formats
W4A16 = tl.constexpr(0)  # signed int4, zero point 8
W4A16_ZP = tl.constexpr(1)  # unsigned int4 with zero points
MXFP4 = tl.constexpr(2)
# activations
SILU = tl.constexpr(0)
SWIGLU_OAI = tl.constexpr(1)


@triton.jit
def _block_order(pid, num_m_blocks, num_n_tiles, GROUP_M: tl.constexpr):
    """(m block, n tile) of a program: GROUP_M consecutive blocks sweep the n tiles together, so
    the weight tiles (same expert) and activation rows they share are read while in L2."""
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _stored_blocks(rows, half, GU_INTERLEAVED: tl.constexpr):
    """Stored 16-row block (within the expert) of each logical row; ``mxfp4_moe``'s w13
    alternates the blocks of gate (rows < half) and up."""
    if GU_INTERLEAVED:
        gu = (rows >= half).to(tl.int32)
        return ((rows - gu * half) // 16) * 2 + gu
    return rows // 16


@triton.jit
def _word_ptrs(w_ptr, expert, rows, blocks, N, K, FMT: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr):
    """Pointers ``[BN, NG, CPG]`` to the int32 code words of ``W[rows, 0:BK]``; those of columns
    ``k0:k0+BK`` are ``2 * k0`` words further (each 16-row strip stores k in runs of 16 rows)."""
    CPG: tl.constexpr = BK // 8 // NG
    CPB: tl.constexpr = mxfp4.WORDS_PER_STRIP if FMT == MXFP4 else w4a16.WORDS_PER_STRIP
    c = tl.arange(0, NG)[None, :, None] * CPG + tl.arange(0, CPG)[None, None, :]
    row_off = blocks * (2 * K) + (rows % 16) * CPB
    return w_ptr + expert * (N * (K // 8)) + row_off[:, None, None] + (c // CPB) * (16 * CPB) + c % CPB


@triton.jit
def _words(w_ptrs, k0, row_ok, valid):
    """The code words of columns ``k0:k0+BK`` (zeros where not ``valid``)."""
    return tl.load(w_ptrs + 2 * k0, mask=row_ok[:, None, None] & valid, other=0)


@triton.jit
def _weight_rows(words, k0, s_ptr, z_ptr, expert, rows, row_ok, blocks, N, G, KSP,
                 FMT: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, OUT: tl.constexpr):
    """Dequantized ``W[rows, k0:k0+BK]`` in OUT, ``[BN, BK]``, from its code words; the tile holds
    NG whole groups of GS columns (or lies inside one)."""
    g = k0 // GS + tl.arange(0, NG)
    if FMT == MXFP4:
        w = mxfp4.dequant(words, s_ptr, expert * (N // 16) + blocks, rows % 16, row_ok, g, KSP, OUT)
    else:
        w = w4a16.dequant(words, s_ptr, z_ptr, expert, rows, row_ok, g, N, G, FMT == W4A16, FMT == W4A16_ZP, OUT)
    return tl.reshape(w, (rows.shape[0], BK))


@triton.jit
def _product(a, words, k0, s_ptr, z_ptr, expert, rows, row_ok, blocks, N, G, KSP, acc,
             FMT: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, PACKED: tl.constexpr,
             SWAP: tl.constexpr):
    """``acc += a @ W[rows, k0:k0+BK]^T``. With one row (decode, one token per block) the
    accumulator is ``[BN, BK]`` and summed once at the end: no MMA operand round trip through
    shared memory, one FMA per weight. PACKED: the MMA operand is decoded straight into bf16, two
    values per instruction (CUDA; see ``_triton.packed_nibbles``). SWAP: the accumulator is the
    transposed ``[BN, BM]`` and the decoded weights are the MMA's first operand, which Hopper's
    wgmma takes from registers, and whose 64-row minimum the weight rows fill when BM is small."""
    DECODED: tl.constexpr = tl.bfloat16 if PACKED and a.shape[0] > 1 else tl.float32
    w = _weight_rows(words, k0, s_ptr, z_ptr, expert, rows, row_ok, blocks, N, G, KSP, FMT, BK, NG, GS, DECODED)
    if a.shape[0] == 1:
        acc += w * a.to(tl.float32)
    else:
        # k runs along each row, as the codes are packed: the tile is W, or B^T without SWAP
        w = opaque(w) if PACKED else rounded(w, a.dtype)
        if SWAP:
            acc = mma(w, tl.trans(a), acc)
        else:
            acc = mma(a, tl.trans(w), acc)
    return acc


@triton.jit
def _accumulator(BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
    if BM == 1:
        acc = tl.zeros((BN, BK), tl.float32)
    elif SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    return acc


@triton.jit
def _result(acc, BM: tl.constexpr, SWAP: tl.constexpr):
    """The ``[BM, BN]`` product from an accumulator of :func:`_accumulator`."""
    if BM == 1:
        acc = tl.sum(acc, axis=1)[None, :]
    elif SWAP:
        acc = tl.trans(acc)
    return acc


ZBLOCK = tl.constexpr(1024)  # w13_kernel's zeroing of the output: each program takes a multiple of this


@triton.jit
def _zero_share(ptr, numel, pid, per, ZBLOCK: tl.constexpr):
    # loop bounds must not depend on the program id: the interpreter cannot iterate over those
    start = pid * per
    end = tl.minimum(start + per, numel)
    zeros = tl.zeros((ZBLOCK,), ptr.dtype.element_ty)
    for z0 in range(0, per, ZBLOCK):
        offs = start + z0 + tl.arange(0, ZBLOCK)
        tl.store(ptr + offs, zeros, mask=offs < end)


@triton.jit
def _sum_of_splits(acc, part_ptr, arrivals_ptr, tile, pid_k, pair, m_ok, rows, n_ok, num_pairs, N,
                   SPLIT_K: tl.constexpr):
    """Stores this split's partial ``[BM, BN]`` product of ``tile``; for the last split of the tile
    to arrive, returns the sum of all its splits (in split order, so results do not depend on the
    order of arrival) and ``True``. The tile's arrival count is left at zero for the next call."""
    offs = pair.to(tl.int64)[:, None] * N + rows[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    tl.store(part_ptr + pid_k * num_pairs * N + offs, acc, mask=ok)
    # release: the partial is visible before the count; acquire: the last one sees every partial
    last = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        tl.store(arrivals_ptr + tile, 0)
        acc = tl.zeros(acc.shape, tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * num_pairs * N + offs, mask=ok, other=0.0, cache_modifier=".cg")
    return acc, last


# batch-dependent arguments are not specialised on: one compiled kernel serves every batch size
@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def w13_kernel(x_ptr, stride_x, perm_ptr, w_ptr, s_ptr, z_ptr, b_ptr, h_ptr, out_ptr, out_numel, zero_per_program,
               part_ptr, arrivals_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, num_m_blocks, H, I, G, KSP,
               alpha, limit, TOP_K: tl.constexpr, FMT: tl.constexpr, GU_INTERLEAVED: tl.constexpr, ACT: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
               GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, PACKED: tl.constexpr, SWAP: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    if pid_k == 0:
        _zero_share(out_ptr, out_numel, pid, zero_per_program, ZBLOCK)
    pid_m, pid_n = _block_order(pid, num_m_blocks, tl.cdiv(I, BN), GROUP_M)
    if pid_m * BM >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
    m_ok = pair < num_pairs
    x_rows = x_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_x
    # one tile of 2 * BN weight rows: the gate rows of h's columns, then their up rows
    j = tl.arange(0, 2 * BN)
    cols = pid_n * BN + j % BN
    n_ok = cols < I
    rows = cols + (j >= BN).to(tl.int32) * I
    blocks = _stored_blocks(rows, I, GU_INTERLEAVED)
    words = _word_ptrs(w_ptr, expert, rows, blocks, 2 * I, H, FMT, BK, NG)
    k_per_split = H // SPLIT_K  # a multiple of BK
    acc = _accumulator(BM, 2 * BN, BK, SWAP)
    if BM == 1:
        next_w = _words(words, pid_k * k_per_split, n_ok, True)
    for dk in range(0, k_per_split, BK):
        k0 = tl.multiple_of(pid_k * k_per_split + dk, BK)
        if BM == 1:  # no MMA pipeline on this path: fetch the next codes before decoding these
            w = next_w
            next_w = _words(words, k0 + BK, n_ok, dk + BK < k_per_split)
        else:
            w = _words(words, k0, n_ok, True)
        kk = k0 + tl.arange(0, BK)
        if HAS_PERM:
            kk = tl.load(perm_ptr + expert * H + kk)
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
        acc = _product(a, w, k0, s_ptr, z_ptr, expert, rows, n_ok, blocks, 2 * I, G, KSP, acc,
                       FMT, BK, NG, GS, PACKED, SWAP)
    acc = _result(acc, BM, SWAP)
    if SPLIT_K > 1:
        acc, last = _sum_of_splits(acc, part_ptr, arrivals_ptr, pid, pid_k, pair, m_ok, rows, n_ok, num_pairs, 2 * I,
                                   SPLIT_K)
        if not last:
            return
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * (2 * I) + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    gate, up = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
    if ACT == SWIGLU_OAI:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
    else:
        h = gate * tl.sigmoid(gate) * up
    cols = pid_n * BN + tl.arange(0, BN)
    tl.store(h_ptr + pair.to(tl.int64)[:, None] * I + cols[None, :], rounded(h, h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (cols < I)[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def w2_kernel(h_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, stride_out, topk_w_ptr,
              sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, num_m_blocks, H, I, G, KSP,
              TOP_K: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
              GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, PACKED: tl.constexpr, SWAP: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _block_order(pid, num_m_blocks, tl.cdiv(H, BN), GROUP_M)
    if pid_m * BM >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
    m_ok = pair < num_pairs
    a_rows = h_ptr + pair.to(tl.int64)[:, None] * I
    cols = pid_n * BN + tl.arange(0, BN)
    n_ok = cols < H
    blocks = cols // 16
    words = _word_ptrs(w_ptr, expert, cols, blocks, H, I, FMT, BK, NG)
    k_per_split = I // SPLIT_K  # a multiple of BK
    acc = _accumulator(BM, BN, BK, SWAP)
    if BM == 1:
        next_w = _words(words, pid_k * k_per_split, n_ok, True)
    for dk in range(0, k_per_split, BK):
        k0 = tl.multiple_of(pid_k * k_per_split + dk, BK)  # lets the scale loads be pipelined
        if BM == 1:  # as in w13_kernel
            w = next_w
            next_w = _words(words, k0 + BK, n_ok, dk + BK < k_per_split)
        else:
            w = _words(words, k0, n_ok, True)
        a = tl.load(a_rows + (k0 + tl.arange(0, BK))[None, :], mask=m_ok[:, None], other=0.0)
        acc = _product(a, w, k0, s_ptr, z_ptr, expert, cols, n_ok, blocks, H, G, KSP, acc,
                       FMT, BK, NG, GS, PACKED, SWAP)
    acc = _result(acc, BM, SWAP)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + expert * H + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(topk_w_ptr + pair, mask=m_ok, other=0.0)[:, None]
    tokens = (pair // TOP_K).to(tl.int64)
    accumulate(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc, m_ok[:, None] & n_ok[None, :])
