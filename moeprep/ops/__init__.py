"""Layout ops: rewrite packed 4-bit weights and E8M0 scales into the (16,16) preshuffled layouts
of AMD's MoE kernels (aiter), and back.

Tensor in, new tensor out (except :func:`repack_into`, which fills a preallocated tensor). Every
function checks its arguments and raises :class:`moeprep.errors.TargetError` with a one-line
message for shapes, dtypes or values a layout cannot take; then it runs the compiled kernels
(``moeprep._C`` on CPU, ``moeprep._C_cuda`` on CUDA tensors). The layout formulas are in
``moeprep/ops/reference.py`` and docs/layouts.md.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..lazy import torch

from ..errors import MoeprepError, TargetError

__all__ = [
    "REPACK_LAYOUTS",
    "kernel_constants",
    "decode_layout",
    "has_cuda_op",
    "SRC_PACKINGS",
    "int4_to_int8",
    "int8_to_int4",
    "pack_int4_per8",
    "preshuffle_int4",
    "repack_into",
    "shuffle_scale",
    "shuffle_scale_w4a16",
    "shuffle_weight",
    "unpack_int4_per8",
    "unpreshuffle_int4",
    "unshuffle_scale",
    "unshuffle_scale_w4a16",
    "unshuffle_weight",
]

SRC_PACKINGS = ("canonical", "ct_int32", "gptq_int32", "awq_int32")
REPACK_LAYOUTS = ("canonical", "shuffle", "guinterleave", "w4a16_signed", "w4a16_unsigned")

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` in the moeprep checkout (needs g++)"
_cuda_problem: str | None = None
_ops = None


def _lib():
    """torch.ops.moeprep, after loading the compiled modules once."""
    global _ops, _cuda_problem
    if _ops is None:
        try:
            from .. import _C  # noqa: F401  (importing registers the op schemas and CPU kernels)
        except ImportError as exc:
            raise MoeprepError(f"the compiled moeprep ops (moeprep._C) are not available ({exc}); {_BUILD_HINT}") from None
        try:
            from .. import _C_cuda  # noqa: F401  (registers the CUDA kernels)
        except ImportError as exc:
            _cuda_problem = str(exc) or "not built"
        _ops = torch.ops.moeprep
    return _ops


_constants: dict[str, int] | None = None


def kernel_constants() -> dict[str, int]:
    """The numbers the CUDA GEMMs and their launchers share (``csrc/kernel_constants.h``), as the
    compiled module reports them: ``decode_window``, ``decode_blocks``, ``decode_block_m``,
    ``decode_warps_per_sm``, ``prefill_block_m``, ``prefill_tile_n``."""
    global _constants
    if _constants is None:
        text = _lib().kernel_constants()
        _constants = {name: int(value) for name, value in (pair.split("=") for pair in text.split(";") if pair)}
    return _constants


def has_cuda_op(name: str) -> bool:
    """Whether this build registered ``torch.ops.moeprep.<name>`` with moeprep's CUDA ops (some, like
    the decode MoE GEMMs, exist only in CUDA builds)."""
    try:
        lib = _lib()
    except MoeprepError:
        return False
    return _cuda_problem is None and hasattr(lib, name)


def _run(name: str, *tensors_then_args):
    ops = _lib()
    for t in tensors_then_args:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            if t.device.type != "cuda":
                raise MoeprepError(f"moeprep ops run on CPU or CUDA tensors, got a {t.device.type} tensor")
            if _cuda_problem is not None:
                raise MoeprepError(
                    f"moeprep's CUDA ops (moeprep._C_cuda) are not available ({_cuda_problem}); move the tensor "
                    f"to the CPU or rebuild with CUDA torch and nvcc: {_BUILD_HINT}"
                )
    return getattr(ops, name)(*tensors_then_args)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TargetError(message)


def _tensor(x, what: str) -> torch.Tensor:
    _require(isinstance(x, torch.Tensor), f"{what} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _dtype_is(x: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    _require(x.dtype == dtype, f"{what} must be {str(dtype).replace('torch.', '')}, got {str(x.dtype).replace('torch.', '')}")


def _values_within(v: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if v.numel():
        mn, mx = (int(a) for a in torch.aminmax(v))
        _require(lo <= mn and mx <= hi, f"{what} must lie in [{lo}, {hi}], found values in [{mn}, {mx}]")


# ---- (16,16) weight shuffle -------------------------------------------------------------------
def _weight_chunk(x: torch.Tensor, layout: Sequence[int], use_int4: bool, is_guinterleave: bool, gate_up: bool) -> int:
    """Checks a shuffle_weight argument set; returns the bytes moved per chunk."""
    _tensor(x, "shuffle_weight input")
    _require(tuple(layout) == (16, 16), f"only layout (16, 16) is supported, got {tuple(layout)}")
    es = x.element_size()
    shape = tuple(x.shape)
    if is_guinterleave:
        _require(x.dim() == 3, f"the gate/up interleaved shuffle needs a 3-D [E, N, K] tensor, got shape {shape}")
        rows = 32 if gate_up else 16
        _require(shape[1] % rows == 0, f"shape {shape}: N={shape[1]} is not a multiple of {rows} (interleaved shuffle, gate_up={gate_up})")
        _require(shape[2] % 64 == 0, f"shape {shape}: K={shape[2]} is not a multiple of 64 (interleaved shuffle)")
        return 16 * es
    _require(x.dim() >= 2, f"shuffle_weight needs a tensor with >= 2 dims [..., N, K], got shape {shape}")
    _require(shape[-2] % 16 == 0, f"shape {shape}: N={shape[-2]} is not a multiple of 16 ((16,16) shuffle)")
    _require(shape[-1] % 32 == 0, f"shape {shape}: K={shape[-1]} is not a multiple of 32 ((16,16) shuffle)")
    return 32 * es if use_int4 else 16


def shuffle_weight(
    x: torch.Tensor,
    layout: Sequence[int] = (16, 16),
    use_int4: bool = False,
    is_guinterleave: bool = False,
    gate_up: bool = False,
) -> torch.Tensor:
    """aiter's ``shuffle_weight`` on ``[..., N, K]`` (any dtype; ``Kin = 16 / element_size``, 32 with
    ``use_int4``). With ``is_guinterleave=True``: aiter's ``shuffle_weight_a16w4(x, 16, gate_up)`` on
    ``[E, N, K]`` (``use_int4`` is ignored there, as in aiter). Same shape and dtype out."""
    chunk = _weight_chunk(x, layout, use_int4, is_guinterleave, gate_up)
    return _run("weight_shuffle", x.contiguous(), chunk, bool(is_guinterleave and gate_up), False)


def unshuffle_weight(
    x: torch.Tensor,
    layout: Sequence[int] = (16, 16),
    use_int4: bool = False,
    is_guinterleave: bool = False,
    gate_up: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`shuffle_weight` with the same arguments."""
    chunk = _weight_chunk(x, layout, use_int4, is_guinterleave, gate_up)
    return _run("weight_shuffle", x.contiguous(), chunk, bool(is_guinterleave and gate_up), True)


# ---- E8M0 scale shuffles ----------------------------------------------------------------------
def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def _scale_plan(shape: tuple, experts_cnt: int | None, is_guinterleave: bool, gate_up: bool) -> tuple:
    """(experts, gate_up, padded rows, padded cols) for E8M0 scales of `shape` ([M, Ks])."""
    _require(len(shape) == 2, f"E8M0 scales must be 2-D [rows, K/32], got shape {shape}")
    m, ks = shape
    if not is_guinterleave:
        return 1, False, _ceil(m, 256), _ceil(ks, 8)
    _require(experts_cnt is not None, "experts_cnt is required for the interleaved scale shuffle")
    _require(isinstance(experts_cnt, int) and experts_cnt > 0, f"experts_cnt must be a positive int, got {experts_cnt!r}")
    _require(m % experts_cnt == 0, f"scale shape {shape}: {m} rows do not split into {experts_cnt} experts")
    _require((m // experts_cnt) % 32 == 0, f"scale shape {shape}: {m // experts_cnt} rows per expert is not a multiple of 32 (interleaved scale shuffle)")
    _require(ks > 0, f"scale shape {shape}: no scale columns")
    return experts_cnt, bool(gate_up), m, _ceil(ks, 8)


def _scale_bytes(s: torch.Tensor, what: str) -> None:
    _tensor(s, what)
    _require(s.element_size() == 1, f"{what} must be E8M0 bytes (uint8 or float8_e8m0fnu), got {str(s.dtype).replace('torch.', '')}")


def shuffle_scale(
    s: torch.Tensor, experts_cnt: int | None = None, is_guinterleave: bool = False, gate_up: bool = False
) -> torch.Tensor:
    """aiter's ``e8m0_shuffle`` on ``[M, Ks]`` (padded to ``(ceil(M/256)*256, ceil(Ks/8)*8)``), or with
    ``is_guinterleave=True`` aiter's ``shuffle_scale_a16w4(s, experts_cnt, gate_up)`` with Ks padded
    to a multiple of 8. Padding is 0x7F (E8M0 1.0)."""
    _scale_bytes(s, "E8M0 scales")
    experts, gu, rows, cols = _scale_plan(tuple(s.shape), experts_cnt, is_guinterleave, gate_up)
    return _run("scale_shuffle", s.contiguous(), experts, gu, rows, cols)


def unshuffle_scale(
    s: torch.Tensor,
    shape: Sequence[int],
    experts_cnt: int | None = None,
    is_guinterleave: bool = False,
    gate_up: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`shuffle_scale`: the original, unpadded scales of `shape`."""
    _scale_bytes(s, "shuffled E8M0 scales")
    shape = tuple(int(d) for d in shape)
    experts, gu, rows, cols = _scale_plan(shape, experts_cnt, is_guinterleave, gate_up)
    _require(tuple(s.shape) == (rows, cols), f"shuffled scales of {shape} must have shape {(rows, cols)}, got {tuple(s.shape)}")
    return _run("scale_unshuffle", s.contiguous(), experts, gu, shape[0], shape[1])


# ---- int4 helpers -----------------------------------------------------------------------------
def _last_dim(x: torch.Tensor, multiple: int, what: str) -> None:
    _require(x.dim() >= 1 and x.shape[-1] % multiple == 0, f"{what} shape {tuple(x.shape)}: last dim must be a multiple of {multiple}")


def int4_to_int8(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Canonical codes uint8 ``[..., K/2]`` (low nibble = even k) -> int8 ``[..., K]``, one value per
    byte: ``q - 8`` if signed, else ``q``."""
    _dtype_is(_tensor(codes, "int4 codes"), torch.uint8, "int4 codes")
    _last_dim(codes, 1, "int4 codes")
    return _run("int4_to_int8", codes.contiguous(), bool(signed))


def int8_to_int4(v: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`int4_to_int8`; values must lie in [-8, 7] (signed) or [0, 15]."""
    _dtype_is(_tensor(v, "int4 values"), torch.int8, "int4 values")
    _last_dim(v, 2, "int4 values")
    _values_within(v, -8 if signed else 0, 7 if signed else 15, f"{'signed' if signed else 'unsigned'} int4 values")
    return _run("int8_to_int4", v.contiguous(), bool(signed))


def pack_int4_per8(v: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., K]`` -> uint8 ``[..., K/2]``: per run of 8 values, byte j = v[j+4] << 4 | v[j]
    (low nibbles). Values must lie in [-8, 15] (signed or unsigned 4-bit)."""
    _dtype_is(_tensor(v, "int4 values"), torch.int8, "int4 values")
    _last_dim(v, 8, "int4 values")
    _values_within(v, -8, 15, "int4 values")
    return _run("pack_int4_per8", v.contiguous())


def unpack_int4_per8(b: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4_per8`; sign-extends the nibbles when `signed`."""
    _dtype_is(_tensor(b, "packed int4"), torch.uint8, "packed int4")
    _last_dim(b, 4, "packed int4")
    return _run("unpack_int4_per8", b.contiguous(), bool(signed))


def _w4a16_codes(x: torch.Tensor, what: str) -> None:
    _dtype_is(_tensor(x, what), torch.uint8, what)
    shape = tuple(x.shape)
    _require(x.dim() >= 2, f"{what} must be [..., N, K/2], got shape {shape}")
    _require(shape[-2] % 16 == 0, f"{what} shape {shape}: N={shape[-2]} is not a multiple of 16")
    _require(shape[-1] % 16 == 0, f"{what} shape {shape}: K={2 * shape[-1]} is not a multiple of 32")


def preshuffle_int4(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Canonical codes uint8 ``[..., N, K/2]`` -> the w4a16 target bytes, in one pass:
    ``pack_int4_per8(shuffle_weight(int4_to_int8(codes, signed)))``."""
    _w4a16_codes(codes, "int4 codes")
    return _run("preshuffle_int4", codes.contiguous(), bool(signed), False)


def unpreshuffle_int4(y: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`preshuffle_int4`."""
    _w4a16_codes(y, "preshuffled int4")
    return _run("preshuffle_int4", y.contiguous(), bool(signed), True)


def _w4a16_scales(s: torch.Tensor, groups_dim: int, what: str) -> None:
    _tensor(s, what)
    shape = tuple(s.shape)
    _require(s.dim() == 3, f"{what} must be 3-D, got shape {shape}")
    _require(shape[groups_dim] % 2 == 0, f"{what} shape {shape}: {shape[groups_dim]} groups is odd (groups are paired)")
    _require(s.element_size() in (1, 2, 4, 8), f"{what}: unsupported dtype {s.dtype}")


def shuffle_scale_w4a16(s: torch.Tensor) -> torch.Tensor:
    """Canonical ``[E, N, G]`` scales or zero points (any dtype) -> ``[E, G, N]`` whose memory is
    ``[E, G/2, N, 2]``: the two groups of a pair side by side per column."""
    _w4a16_scales(s, 2, "w4a16 scales [E, N, G]")
    return _run("scale_w4a16", s.contiguous(), False)


def unshuffle_scale_w4a16(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`shuffle_scale_w4a16`: ``[E, G, N]`` -> ``[E, N, G]``."""
    _w4a16_scales(y, 1, "shuffled w4a16 scales [E, G, N]")
    return _run("scale_w4a16", y.contiguous(), True)


# ---- fused conversion -------------------------------------------------------------------------
def _source_rows_and_k(src: torch.Tensor, src_packing: str) -> tuple[int, int]:
    """(rows n, logical K) of a repack_into source."""
    _require(src.dim() == 2, f"{src_packing} source must be 2-D, got shape {tuple(src.shape)}")
    a, b = src.shape
    if src_packing == "canonical":
        _dtype_is(src, torch.uint8, "canonical source")
        return a, 2 * b
    _dtype_is(src, torch.int32, f"{src_packing} source")
    if src_packing == "ct_int32":
        return a, 8 * b
    if src_packing == "gptq_int32":
        return b, 8 * a
    return 8 * b, a


def _index(idx, length: int, bound: int, what: str, device: torch.device) -> torch.Tensor | None:
    if idx is None:
        return None
    _tensor(idx, what)
    _dtype_is(idx, torch.int64, what)
    _require(idx.dim() == 1 and idx.numel() == length, f"{what} must have shape ({length},), got {tuple(idx.shape)}")
    _require(idx.device == device, f"{what} is on {idx.device}, dst on {device}")
    _values_within(idx, 0, bound - 1, what)
    return idx.contiguous()


def repack_into(
    dst: torch.Tensor,
    src: torch.Tensor,
    *,
    src_packing: str,
    layout: str,
    expert: int,
    row_offset: int = 0,
    gate_up: bool = False,
    row_index: torch.Tensor | None = None,
    col_index: torch.Tensor | None = None,
) -> None:
    """Writes the n rows of a packed 4-bit source into logical rows ``[row_offset, row_offset+n)``
    of expert `expert` of ``dst`` (uint8 ``[E, N_total, K/2]``, logically canonical codes per expert)
    in `layout`, reading `src` once and writing dst once.

    src_packing: ``canonical`` uint8 ``[n, K/2]``; ``ct_int32`` int32 ``[n, K/8]``; ``gptq_int32``
    int32 ``[K/8, n]``; ``awq_int32`` int32 ``[K, n/8]`` (AWQ column order). Nibbles are unsigned codes.
    layout: ``canonical``, ``shuffle``, ``guinterleave`` (with `gate_up`: rows ``[0, N_total/2)`` are
    gate, the rest up), ``w4a16_signed`` (stores q ^ 8), ``w4a16_unsigned``.
    row_index ``[n]`` / col_index ``[K]`` (int64): logical row r / element k reads source row
    ``row_index[r]`` / element ``col_index[k]`` (GPTQ desc_act).
    """
    _require(src_packing in SRC_PACKINGS, f"src_packing must be one of {', '.join(SRC_PACKINGS)}, got {src_packing!r}")
    _require(layout in REPACK_LAYOUTS, f"layout must be one of {', '.join(REPACK_LAYOUTS)}, got {layout!r}")
    _dtype_is(_tensor(dst, "repack_into dst"), torch.uint8, "repack_into dst")
    _tensor(src, "repack_into src")
    _require(dst.dim() == 3 and dst.is_contiguous(), f"repack_into dst must be a contiguous [E, N, K/2] tensor, got shape {tuple(dst.shape)}")
    _require(src.device == dst.device, f"repack_into src is on {src.device}, dst on {dst.device}")
    n_exp, n_total, half_k = dst.shape
    k = 2 * half_k
    n, src_k = _source_rows_and_k(src, src_packing)
    _require(src_k == k, f"{src_packing} source of shape {tuple(src.shape)} holds K={src_k}, dst rows hold K={k}")
    _require(isinstance(expert, int) and 0 <= expert < n_exp, f"expert {expert!r} out of range for {n_exp} experts")
    _require(isinstance(row_offset, int) and row_offset >= 0 and row_offset + n <= n_total,
             f"rows [{row_offset}, {row_offset + n}) do not fit in dst's {n_total} rows")
    _require(not gate_up or layout == "guinterleave", f"gate_up=True only applies to layout 'guinterleave', got {layout!r}")
    if layout != "canonical":
        _require(row_offset % 16 == 0 and n % 16 == 0,
                 f"layout {layout!r} moves 16-row tiles: row_offset={row_offset} and n={n} must be multiples of 16")
        k_multiple = {"shuffle": 64, "guinterleave": 128}.get(layout, 32)
        _require(k % k_multiple == 0, f"layout {layout!r} needs K a multiple of {k_multiple}, got K={k}")
    if layout == "guinterleave":
        _require(n_total % (32 if gate_up else 16) == 0,
                 f"layout 'guinterleave' (gate_up={gate_up}) needs N_total a multiple of {32 if gate_up else 16}, got {n_total}")
    row_index = _index(row_index, n, n, "row_index", dst.device)
    col_index = _index(col_index, k, k, "col_index", dst.device)
    if src.stride(-1) != 1:
        src = src.contiguous()
    _run("repack_into", dst, src, src_packing, layout, expert, row_offset, bool(gate_up), row_index, col_index)


def decode_layout(y: torch.Tensor, layout: str, gate_up: bool = False) -> torch.Tensor:
    """A whole tensor stored in one of ``repack_into``'s layouts, back to canonical codes
    ``[E, N, K/2]`` (the exact inverse of what ``repack_into`` writes)."""
    _require(layout in REPACK_LAYOUTS, f"layout must be one of {', '.join(REPACK_LAYOUTS)}, got {layout!r}")
    if layout == "canonical":
        return y
    if layout == "shuffle":
        return unshuffle_weight(y)
    if layout == "guinterleave":
        return unshuffle_weight(y, is_guinterleave=True, gate_up=gate_up)
    return unpreshuffle_int4(y, signed=layout == "w4a16_signed")
