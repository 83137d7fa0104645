"""The canonical form every source format is read into, and its dequantization.

One quantized linear, HF orientation ``[N = out_features, K = in_features]``:

* ``codes``  uint8 ``[N, K/2]``, two 4-bit codes per byte, low nibble = even k. For int4 the
  codes are unsigned (0..15); for MXFP4 they are E2M1 bit patterns.
* ``scales`` ``[N, K/G]`` exactly as stored (fp16/bf16 for int4, E8M0 bytes for MXFP4).
* ``zeros``  uint8 ``[N, K/G]`` unsigned zero points (int4 only); ``None`` means the symmetric
  zero point 8.
* ``g_idx``  int32 ``[K]`` group of each input channel; ``None`` means ``k // G``.
* ``bias``   ``[N]`` or ``None``.

``W[n, k] = (codes[n, k] - zeros[n, g(k)]) * scales[n, g(k)]`` for int4 and
``W[n, k] = e2m1(codes[n, k]) * 2**(scales[n, k // 32] - 127)`` for MXFP4, in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

from .lazy import torch

Kind = Literal["int4", "mxfp4"]

SYMMETRIC_ZERO = 8
MXFP4_GROUP = 32

# OCP MX E2M1 code points; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass
class QuantLinear:
    kind: Kind
    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    zeros: Optional[torch.Tensor] = None
    g_idx: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 2

    def with_(self, **changes) -> "QuantLinear":
        return replace(self, **changes)


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> uint8 ``[..., K]``, one code per byte."""
    lo = codes & 0x0F
    hi = codes >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K]`` (values 0..15) -> uint8 ``[..., K/2]``, low nibble = even k."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def explicit_zeros(zeros: Optional[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
    """Zero points with the implicit symmetric zero made explicit: one uint8 per scale."""
    if zeros is not None:
        return zeros
    return torch.full(scales.shape, SYMMETRIC_ZERO, dtype=torch.uint8, device=scales.device)


def group_index(ql: QuantLinear) -> torch.Tensor:
    """Group of every input channel, int64 ``[K]``."""
    if ql.g_idx is not None:
        return ql.g_idx.to(torch.int64)
    return torch.arange(ql.in_features, dtype=torch.int64) // ql.group_size


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> float32 powers of two; 0xFF is NaN as in the OCP MX spec."""
    e = scales.to(torch.int32)
    out = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 127)
    return torch.where(e == 0xFF, torch.full_like(out, float("nan")), out)


def invalid_scales(kind: Kind, scales: torch.Tensor) -> tuple[int, float]:
    """(how many, the first) of the scales that no quantizer writes: NaN, infinite, zero or
    negative int4 scales; E8M0 0xFF (NaN)."""
    if kind == "mxfp4":
        bad = scales.view(torch.uint8) == 0xFF
        values = scales.view(torch.uint8)
    else:
        values = scales.float()
        bad = ~torch.isfinite(values) | (values <= 0)
    count = int(bad.sum())
    return count, (float(values[bad][0]) if count else 0.0)


def dequantize(ql: QuantLinear, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The exact float32 weight ``[N, K]`` (then cast to ``dtype``, if given)."""
    q = unpack_codes(ql.codes)
    if ql.kind == "mxfp4":
        values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=q.device)[q.to(torch.int64)]
        scale = e8m0_to_float(ql.scales).repeat_interleave(MXFP4_GROUP, dim=1)
        w = values * scale
    else:
        g = group_index(ql).to(q.device)
        scale = ql.scales.to(torch.float32)[:, g]
        if ql.zeros is None:
            z = torch.full((), SYMMETRIC_ZERO, dtype=torch.int32, device=q.device)
        else:
            z = ql.zeros.to(torch.int32)[:, g]
        w = (q.to(torch.int32) - z).to(torch.float32) * scale
    return w if dtype is None else w.to(dtype)
