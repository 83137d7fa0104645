"""Fused MoE kernels on moeprep's stored layouts, for NVIDIA and AMD GPUs.

Modules: ``routing`` (scores, top-k, per-expert block alignment), ``layer`` (a stored layer as
the kernels take it), ``backend`` (what a GPU backend provides, and their registry), and the
backends: ``triton_gemms`` (the grouped GEMMs of ``moe_gemm``, with the in-register decode of each
code family in ``w4a16`` and ``mxfp4``; every GPU), ``mma_decode`` (CUDA tensor-core decode GEMMs,
``csrc/moe_decode.cu``) and ``wgmma_prefill`` (CUDA Hopper prefill GEMMs, ``csrc/moe_prefill.cu``).
``configs`` holds the configurations and reads the tuned tables (``tuned/*.json``); ``fused``
chooses the backend and runs a layer (:func:`fused_moe`). Their tests are ``tests/test_kernels*.py``,
against the plain-torch MoE of ``moeprep.serve.torch_moe``.

Triton is optional: :func:`available` says whether these kernels can run here.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import MoeprepError

__all__ = ["available", "routes", "supports", "fused_moe", "fused_experts"]


def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Triton is importable and there is a GPU (CUDA or HIP) to run on."""
    return _have_triton() and torch.cuda.is_available()


def routes(routing, num_experts: int) -> bool:
    """Whether the routing kernel computes this routing over ``num_experts`` experts."""
    if not _have_triton():
        return False
    from .routing import kernel_routes

    return kernel_routes(routing, num_experts)


def supports(experts) -> bool:
    """Whether the kernels handle this layer's stored layout and shapes."""
    if not _have_triton():
        return False
    from .layer import problems

    return not problems(experts)


def _check_device(hidden) -> None:
    if not _have_triton():
        raise MoeprepError("the fused MoE kernels need Triton (`pip install triton`)")
    if hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise MoeprepError(f"the fused MoE kernels run on a GPU; hidden states are on {hidden.device}")


def fused_moe(hidden, router_logits, routing, experts, activation, config=None, correction_bias=None) -> torch.Tensor:
    """See :func:`moeprep.kernels.fused.fused_moe`."""
    _check_device(hidden)
    from .fused import fused_moe as run

    return run(hidden, router_logits, routing, experts, activation, config, correction_bias)


def fused_experts(hidden, topk_weights, topk_ids, experts, activation, config=None) -> torch.Tensor:
    """See :func:`moeprep.kernels.fused.fused_experts`."""
    _check_device(hidden)
    from .fused import fused_experts as run

    return run(hidden, topk_weights, topk_ids, experts, activation, config)
