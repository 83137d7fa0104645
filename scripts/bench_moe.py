#!/usr/bin/env python3
"""Fused MoE kernels (moeprep.kernels) against what a torch user would run, on one GPU.

For each model's expert shapes (synthetic random weights of the real sizes, stored in the target
layout) and each batch size T, in one run:

* route us    : our routing kernel(s): scores, top-k, per-expert block alignment
* route torch : torch's chain for the same job (softmax, topk, stable sort of the expert ids, counts)
* moe us      : our whole MoE layer (routing + both grouped GEMMs, output written in place)
* bf16 us     : torch on dequantized bf16 weights: routing chain, gather, torch._grouped_mm,
                activation, torch._grouped_mm, weighted scatter-add (a per-expert loop if
                _grouped_mm is missing)
* GB/s, %copy : expert bytes our layer touched (codes, scales, zero points, biases of the
                experts in use) over its time, and as a share of a device-to-device copy measured
                in the same run (bytes read + written)
* err         : ||out - ref|| / ||ref|| against the fp32 reference on the same routing

Every time is the median of CUDA-graph replays with the L2 cache flushed before each one
(triton.testing.do_bench), so launch gaps and cached weights do not flatter anything.

    python scripts/bench_moe.py                       # the table
    python scripts/bench_moe.py --tune --tokens 1,64  # sweep tile configs per GEMM, print the best
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from moeprep.canonical import dequantize  # noqa: E402
from moeprep.kernels import fused_moe  # noqa: E402
from moeprep.kernels.configs import GemmConfig, MoEConfig  # noqa: E402
from moeprep.kernels.fused import launch_w13, launch_w2, pick_config, prepare  # noqa: E402
from moeprep.kernels.routing import route as route_kernel  # noqa: E402
from moeprep.kernels.testing import layer_to, linears_to, random_layer  # noqa: E402
from moeprep.serve.reference import Activation, experts_reference  # noqa: E402
from moeprep.serve.routing import Routing, route  # noqa: E402


@dataclass(frozen=True)
class Model:
    target: str
    experts: int
    hidden: int
    inter: int
    routing: Routing
    activation: Activation
    bias: bool = False
    group: int = 32


MODELS = {
    "qwen3-30b-a3b": Model("w4a16_preshuffle", 128, 2048, 768, Routing("softmax_topk", 8, True, True), Activation("silu")),
    "qwen3-30b-a3b-zp": Model("w4a16_preshuffle_zp", 128, 2048, 768, Routing("softmax_topk", 8, True, True),
                              Activation("silu"), group=128),
    "gpt-oss-120b": Model("mxfp4_preshuffle", 128, 2880, 2880, Routing("topk_softmax", 4, False),
                          Activation("swiglu_oai", 1.702, 7.0), bias=True),
    "mixtral-8x7b": Model("w4a16_preshuffle", 8, 4096, 14336, Routing("softmax_topk", 2, True), Activation("silu")),
}
TOKENS = (1, 4, 16, 64, 512, 2048, 8192)


def timed_us(fn, graph: bool = True) -> float:
    """Median microseconds of fn, L2 flushed before each run; replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = timed_us(lambda: dst.copy_(src), graph=False)
    return 2 * (1 << 30) / us / 1e3


# ---- the torch side ----------------------------------------------------------------------
def torch_routing_chain(logits: torch.Tensor, routing: Routing, num_experts: int):
    weights, ids = route(logits, routing)
    flat = ids.flatten()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=logits.device).scatter_add_(0, flat, torch.ones_like(flat))
    return weights, ids, order, counts.cumsum(0).to(torch.int32)


def _act(gate: torch.Tensor, up: torch.Tensor, act: Activation) -> torch.Tensor:
    if act.kind == "swiglu_oai":
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
        return (up + 1) * gate * torch.sigmoid(gate * act.alpha)
    return F.silu(gate) * up


class TorchBf16:
    """The MoE layer on dequantized bf16 weights with torch's grouped GEMM."""

    def __init__(self, source, model: Model):
        dq = lambda ql: dequantize(ql, torch.bfloat16)  # noqa: E731
        self.w13 = torch.stack([torch.cat([dq(ex["gate"]), dq(ex["up"])]) for ex in source])  # [E, 2I, H]
        self.w2 = torch.stack([dq(ex["down"]) for ex in source])  # [E, H, I]
        self.b13 = torch.stack([torch.cat([ex["gate"].bias, ex["up"].bias]) for ex in source]).bfloat16() if model.bias else None
        self.b2 = torch.stack([ex["down"].bias for ex in source]).bfloat16() if model.bias else None
        self.model = model
        self.grouped = hasattr(torch, "_grouped_mm")
        if self.grouped:
            try:
                x = torch.randn(32, model.hidden, device="cuda", dtype=torch.bfloat16)
                offs = torch.full((model.experts,), 32, dtype=torch.int32, device="cuda")
                torch._grouped_mm(x, self.w13.transpose(1, 2), offs=offs)
            except (RuntimeError, NotImplementedError) as exc:
                print(f"torch._grouped_mm unusable here ({exc}); per-expert loop instead", file=sys.stderr)
                self.grouped = False

    def __call__(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        m = self.model
        weights, ids, order, offs = torch_routing_chain(logits, m.routing, m.experts)
        expert = ids.flatten()[order]
        tok = order // m.routing.top_k
        xs = x[tok]
        if self.grouped:
            gu = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs)
        else:
            gu = self._loop(xs, self.w13, offs)
        if self.b13 is not None:
            gu = gu + self.b13[expert]
        a = _act(gu[:, : m.inter], gu[:, m.inter :], m.activation)
        y = torch._grouped_mm(a, self.w2.transpose(1, 2), offs=offs) if self.grouped else self._loop(a, self.w2, offs)
        if self.b2 is not None:
            y = y + self.b2[expert]
        y = y * weights.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)

    @staticmethod
    def _loop(a, w, offs):
        out, start = [], 0
        for e, end in enumerate(offs.tolist()):
            out.append(a[start:end] @ w[e].T)
            start = end
        return torch.cat(out)


# ---- one model ---------------------------------------------------------------------------
def expert_bytes(layer, model: Model) -> int:
    total = 0
    for proj, (rows, cols) in (("w13", (2 * model.inter, model.hidden)), ("w2", (model.hidden, model.inter))):
        groups = cols // model.group
        total += rows * cols // 2
        total += rows * groups * layer.tensors[f"{proj}_weight_scale"].element_size()
        if f"{proj}_weight_zero_point" in layer.tensors:
            total += rows * groups
        if f"{proj}_bias" in layer.tensors:
            total += rows * layer.tensors[f"{proj}_bias"].element_size()
    return total


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_model(name: str, model: Model, tokens, copy: float, rows: list) -> None:
    t0 = time.time()
    layer_cpu, source_cpu = random_layer(model.target, model.experts, model.hidden, model.inter,
                                         group_size=model.group, bias=model.bias, seed=0)
    experts = layer_to(layer_cpu, "cuda")
    source = linears_to(source_cpu, "cuda")
    per_expert = expert_bytes(layer_cpu, model)
    del layer_cpu, source_cpu
    baseline = TorchBf16(source, model)
    print(f"# {name}: {model.target}, layer built in {time.time() - t0:.0f} s", file=sys.stderr)
    routing, act = model.routing, model.activation
    stored = prepare(experts)
    for T in tokens:
        x = torch.randn(T, model.hidden, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(T, model.experts, device="cuda", dtype=torch.bfloat16)
        cfg = pick_config(stored, T, routing.top_k, x.device)
        r = route_kernel(logits, routing, cfg.block_m)
        used = torch.unique(r.topk_ids).numel()
        out = fused_moe(x, logits, routing, experts, act)
        ref = experts_reference(x.float(), r.topk_weights, r.topk_ids.long(), source, act)
        row = dict(
            model=name, target=model.target, T=T,
            route_us=timed_us(lambda: route_kernel(logits, routing, cfg.block_m)),
            torch_route_us=timed_us(lambda: torch_routing_chain(logits, routing, model.experts)),
            moe_us=timed_us(lambda: fused_moe(x, logits, routing, experts, act)),
            bf16_us=timed_us(lambda: baseline(x, logits), graph=baseline.grouped),
            touched_mb=used * per_expert / 1e6,
            err=rel_err(out, ref),
            bf16_err=rel_err(baseline(x, logits), ref),
            config=asdict(cfg),
        )
        row["gbps"] = used * per_expert / row["moe_us"] / 1e3
        row["pct_copy"] = 100 * row["gbps"] / copy
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del ref


# ---- tuning ------------------------------------------------------------------------------
ONE_ROW_TILES = [(16, 128, 4, 3), (32, 128, 4, 3), (32, 64, 4, 4), (64, 128, 8, 3), (32, 256, 8, 3), (16, 256, 4, 3)]
DECODE_TILES = [(32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (32, 256, 4, 3)]
PREFILL_TILES = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 8, 4)]


def _candidates(T: int, model: Model):
    """(block_m, tiles, split-K choices) to sweep for one batch size."""
    per_expert = T * model.routing.top_k / model.experts
    if per_expert <= 8:
        yield 1, ONE_ROW_TILES, (1, 4)
        yield 16, DECODE_TILES, (1, 4)
    else:
        for bm in (32, 64, 128):
            if bm <= 2 * per_expert:
                yield bm, PREFILL_TILES, (1,)


def tune_model(name: str, model: Model, tokens, results: list) -> None:
    layer, _ = random_layer(model.target, model.experts, model.hidden, model.inter, group_size=model.group,
                            bias=model.bias, seed=0)
    experts = layer_to(layer, "cuda")
    stored = prepare(experts)
    routing, act = model.routing, model.activation
    for T in tokens:
        x = torch.randn(T, model.hidden, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(T, model.experts, device="cuda", dtype=torch.bfloat16)
        best = None
        for bm, tiles, splits in _candidates(T, model):
            r = route_kernel(logits, routing, bm)
            h = torch.empty(T * routing.top_k, model.inter, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(T, model.hidden, device="cuda", dtype=torch.bfloat16)
            t13, t2 = [], []
            for tile in tiles:
                cfg = pick_config(stored, T, routing.top_k, x.device, MoEConfig(bm, GemmConfig(*tile), GemmConfig(*tile)))
                t13.append((timed_us(lambda c=cfg: launch_w13(stored, x, r, h, out, act, c), graph=False), cfg.w13))
                for split in splits:
                    c2 = MoEConfig(bm, GemmConfig(*tile), GemmConfig(*tile, split_k=split))
                    cfg = pick_config(stored, T, routing.top_k, x.device, c2)
                    t2.append((timed_us(lambda c=cfg: launch_w2(stored, h, r, out, c), graph=False), cfg.w2))
            a, b = min(t13, key=lambda t: t[0]), min(t2, key=lambda t: t[0])
            if best is None or a[0] + b[0] < best[0]:
                best = (a[0] + b[0], bm, a, b)
        _, bm, (us13, c13), (us2, c2) = best
        results.append(dict(model=name, T=T, block_m=bm, w13=asdict(c13), w13_us=us13, w2=asdict(c2), w2_us=us2))
        print(json.dumps(results[-1]), file=sys.stderr)


def print_table(rows: list, copy: float) -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"device-to-device copy {copy:.0f} GB/s (read + written)")
    head = ["model", "target", "T", "route us", "torch route us", "speedup", "moe us", "bf16 us", "moe/bf16",
            "touched MB", "GB/s", "%copy", "err", "bf16 err"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['model']} | {r['target']} | {r['T']} | {r['route_us']:.1f} | {r['torch_route_us']:.1f} | "
              f"{r['torch_route_us'] / r['route_us']:.1f}x | {r['moe_us']:.1f} | {r['bf16_us']:.1f} | "
              f"{r['moe_us'] / r['bf16_us']:.2f} | {r['touched_mb']:.0f} | {r['gbps']:.0f} | {r['pct_copy']:.0f}% | "
              f"{r['err']:.1e} | {r['bf16_err']:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated batch sizes T")
    p.add_argument("--tune", action="store_true", help="sweep tile configurations instead of the table")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    rows: list = []
    if args.tune:
        for name in args.models.split(","):
            tune_model(name, MODELS[name], tokens, rows)
    else:
        copy = copy_gbps()
        for name in args.models.split(","):
            bench_model(name, MODELS[name], tokens, copy, rows)
            torch.cuda.empty_cache()
        print_table(rows, copy)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
