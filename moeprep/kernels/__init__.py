"""Fused MoE kernels (Triton) on moeprep's stored layouts, for NVIDIA and AMD GPUs.

Modules, each beside its reference (``reference.py``) and tests (``tests/test_kernels*.py``):
``routing`` (scores, top-k, per-expert block alignment), ``w4a16`` and ``mxfp4`` (in-register
dequantization of each stored format), ``moe_gemm`` (the two grouped GEMMs with the activation
and the weighted top-k sum fused in), ``configs`` (tile sizes), ``fused`` (the entry point, :func:`fused_moe`).
On CUDA, decode batches take hand-written tensor-core GEMMs instead
(``mma_decode``, ``csrc/moe_decode.cu``), and int4 prefill batches on Hopper the wgmma GEMMs
(``wgmma_prefill``, ``csrc/moe_prefill.cu``), where the configuration asks for them.

Triton is optional: :func:`available` says whether these kernels can run here.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import MoeprepError

__all__ = ["available", "supports", "fused_moe"]


def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Triton is importable and there is a GPU (CUDA or HIP) to run on."""
    return _have_triton() and torch.cuda.is_available()


def supports(experts) -> bool:
    """Whether the kernels handle this layer's stored layout and shapes."""
    if not _have_triton():
        return False
    from .fused import problems

    return not problems(experts)


def fused_moe(hidden, router_logits, routing, experts, activation, config=None) -> torch.Tensor:
    """See :func:`moeprep.kernels.fused.fused_moe`."""
    if not _have_triton():
        raise MoeprepError("the fused MoE kernels need Triton (`pip install triton`)")
    if hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise MoeprepError(f"the fused MoE kernels run on a GPU; hidden states are on {hidden.device}")
    from .fused import fused_moe as run

    return run(hidden, router_logits, routing, experts, activation, config)
