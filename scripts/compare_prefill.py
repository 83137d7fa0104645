#!/usr/bin/env python3
"""The int4 prefill GEMMs side by side: a model's MoE layer with the CUDA Hopper GEMMs
(kernels/wgmma_prefill.py), the same layer with the tuned table's Triton GEMMs, and torch's bf16
grouped GEMM, in one run per (model, T), with each kernel's time inside the wgmma layer's graph. What
decides the tuned tables' ``cuda_wgmma_prefill`` entries.

    python scripts/compare_prefill.py --models mixtral-8x7b --tokens 512,2048,8192

Times as in scripts/bench_moe.py (median of graph replays, L2 flushed before each); err is the
wgmma layer's against the fp32 reference.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import bench_moe as bm
from moeprep.kernels import fused_moe
from moeprep.kernels.fused import call_config, pick_config
from moeprep.kernels.layer import prepare
from moeprep.kernels.routing import route_tokens as route_kernel
from moeprep.serve.torch_moe import experts_reference
from kernel_layers import layer_to, linears_to

INT4_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "qwen3-30b-a3b-zp")


def compare(name: str, tokens) -> None:
    model = bm.MODELS[name]
    layer_cpu, source_cpu = bm.build(model)
    experts, source = layer_to(layer_cpu, "cuda"), linears_to(source_cpu, "cuda")
    baseline, stored = bm.TorchBf16(source, model), prepare(experts)
    routing, act = model.routing, model.activation
    for T in tokens:
        x = torch.randn(T, model.hidden, device="cuda", dtype=torch.bfloat16)
        logits = bm.router_logits(name, model, T)
        cfg = pick_config(stored, T, routing.top_k, x.device)
        wgmma = replace(cfg, backend="cuda_wgmma_prefill", mma=None)
        triton = replace(cfg, backend="triton", mma=None)
        if call_config(stored, x, routing.top_k, act, wgmma).backend != "cuda_wgmma_prefill":
            raise SystemExit(f"{name}: the wgmma GEMMs do not apply on this device or build")
        r = route_kernel(logits, routing, 16)
        ref = experts_reference(x.float(), r.topk_weights, r.topk_ids.long(), source, act)
        err = bm.rel_err(fused_moe(x, logits, routing, experts, act, config=wgmma), ref)
        ours = bm.timed_us(lambda: fused_moe(x, logits, routing, experts, act, config=wgmma))
        tri = bm.timed_us(lambda: fused_moe(x, logits, routing, experts, act, config=triton))
        bf = bm.timed_us(lambda: baseline(x, logits), graph=baseline.grouped)
        _, parts = bm.kernel_breakdown(lambda: fused_moe(x, logits, routing, experts, act, config=wgmma), replays=10)
        kernels = ", ".join(f"{k} {d:.1f}" for k, _, d in parts)
        print(f"| {name} | {T} | {ours:.1f} | {tri:.1f} | {bf:.1f} | {ours / bf:.2f} | {tri / bf:.2f} | {err:.1e} | "
              f"{kernels} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(INT4_MODELS), help=f"comma-separated, from {', '.join(INT4_MODELS)}")
    p.add_argument("--tokens", default="512,2048,8192", help="comma-separated batch sizes T")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | T | wgmma us | Triton us | bf16 us | wgmma/bf16 | Triton/bf16 | err | wgmma layer's kernels, us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        compare(name, [int(t) for t in args.tokens.split(",")])


if __name__ == "__main__":
    main()
