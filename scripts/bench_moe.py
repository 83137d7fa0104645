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
* in model us : T <= 64: our layer's time as a model runs it, one of CHAIN layers (each with its
                own copy of the weights, each layer's output the next one's input) in one CUDA
                graph, the time of the graph / CHAIN; %copy in model as above. The graph's own
                launch (~3 us before its first kernel, paid once per forward pass in a served
                model) is then spread over CHAIN layers instead of charged to each
* err         : ||out - ref|| / ||ref|| against the fp32 reference on the same routing

Router logits are drawn from a seed per (model, T) (router_logits), so that every run and every
sweep routes to the same experts and touches the same bytes; activations are fresh each run.

Every time is the median of CUDA-graph replays with the L2 cache flushed before each one
(triton.testing.do_bench), so launch gaps and cached weights do not flatter anything.

    python scripts/bench_moe.py                       # the table
    python scripts/bench_moe.py --tune --tokens 1,64  # sweep tile configs per GEMM, print tuned-table entries
    python scripts/bench_moe.py --tune --write  # and merge them into moeprep/kernels/tuned/<this GPU>.json
    python scripts/bench_moe.py --breakdown --tokens 1,4,16  # per-kernel times inside the layer's graph

Kernels are compiled ahead in ``--jobs`` worker processes (each launches a GEMM once on a
zero-filled layer of the same shapes, which fills Triton's on-disk cache); the timings all run in
this process, one at a time. ``--tune`` compiles every candidate that way, then times each GEMM alone.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # kernel_layers: random stored layers

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from moeprep.canonical import dequantize  # noqa: E402
from moeprep.kernels import fused_moe  # noqa: E402
from moeprep.kernels import configs, mma_decode  # noqa: E402
from moeprep.kernels.configs import GemmConfig, MmaDecode, MmaGemm, MoEConfig, fit  # noqa: E402
from moeprep.kernels.fused import call_config, pick_config  # noqa: E402
from moeprep.kernels.layer import prepare  # noqa: E402
from moeprep.kernels.triton_gemms import launch_w13, launch_w2  # noqa: E402
from kernel_layers import layer_to, linears_to, random_layer  # noqa: E402
from moeprep.kernels.routing import route_tokens as route_kernel  # noqa: E402
from moeprep.moe import Activation, Routing, route  # noqa: E402
from moeprep.serve.torch_moe import expert_down, expert_hidden, experts_reference  # noqa: E402


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
DEFAULT_MODELS = tuple(MODELS)
# The routed experts of the families of ARCHITECTURES.md at their real shapes (int4, group 32;
# shared experts run beside them and are not timed here). Not in the default run: a DeepSeek-V3
# layer is 5.6 GB of int4 experts, and the decode chain holds 8 of them.
MODELS.update({
    "qwen3.5-35b-a3b": Model("w4a16_preshuffle", 256, 2048, 512, Routing("softmax_topk", 8, True), Activation("silu")),
    "deepseek-v3": Model("w4a16_preshuffle", 256, 7168, 2048, Routing("noaux_tc", 8, True, n_group=8, topk_group=4, scaling=2.5),
                         Activation("silu")),
    "kimi-k2": Model("w4a16_preshuffle", 384, 7168, 2048, Routing("noaux_tc", 8, True, scaling=2.827), Activation("silu")),
    "glm-4.5": Model("w4a16_preshuffle_zp", 160, 5120, 1536, Routing("noaux_tc", 8, True, scaling=2.5), Activation("silu")),
})
TOKENS = (1, 4, 16, 64, 512, 2048, 8192)
CHAIN = 8  # layers in the in-model timing's graph
CHAIN_MAX_T = 64  # timed in a chain up to this T (decode), where a launch is a visible share


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up run on a side stream): its replay."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def timed_us(fn, graph: bool = True, rep_ms: int = 60) -> float:
    """Median microseconds of fn, L2 flushed before each run; replayed from a CUDA graph."""
    if graph:
        fn = graphed(fn)
    else:
        fn()
        torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def kernel_name(name: str) -> str:
    """"void ns::(anonymous namespace)::w13_kernel<8, 3, ...>(...)" -> "w13_kernel"."""
    return name.removeprefix("void ").split("<")[0].split("(anonymous namespace)::")[-1].split("::")[-1].split("(")[0]


def kernel_breakdown(fn, replays: int = 30) -> tuple[float, list]:
    """Where fn's time goes on the GPU, from the profiler's kernel records (CUPTI) over CUDA-graph
    replays, each after an L2 flush as in timed_us: (microseconds from the flush's end to the last
    kernel's end, [(kernel, gap since the previous kernel ended, duration)]), medians over replays.
    A negative gap is an overlap (a programmatic dependent launch)."""
    replay = graphed(fn)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            flush.zero_()
            replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    per_replay = len(kernels) // replays  # the flush, then the graph's kernels
    runs = [kernels[i:i + per_replay] for i in range(0, per_replay * replays, per_replay)]
    if len(kernels) % replays or any([k["name"] for k in r] != [k["name"] for k in runs[0]] for r in runs):
        raise RuntimeError("the profiler's kernel records do not repeat once per replay")
    median = statistics.median
    parts = []
    for i in range(1, per_replay):
        gaps = [r[i]["ts"] - r[i - 1]["ts"] - r[i - 1]["dur"] for r in runs]
        parts.append((kernel_name(runs[0][i]["name"]), median(gaps), median(r[i]["dur"] for r in runs)))
    span = median(r[-1]["ts"] + r[-1]["dur"] - r[0]["ts"] - r[0]["dur"] for r in runs)
    return span, parts


def router_logits(name: str, model: Model, T: int) -> torch.Tensor:
    """Random normal router logits, the same for a (model, T) in every run."""
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{name}/{T}".encode()))
    return torch.randn(T, model.experts, device="cuda", generator=gen).to(torch.bfloat16)


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


def build(model: Model):
    """(stored layer, canonical experts) on the CPU: synthetic random weights of the model's shapes."""
    return random_layer(model.target, model.experts, model.hidden, model.inter, group_size=model.group,
                        bias=model.bias, seed=0)


def bench_model(name: str, model: Model, layer_cpu, source_cpu, tokens, copy: float, rows: list) -> None:
    t0 = time.time()
    experts = layer_to(layer_cpu, "cuda")
    source = linears_to(source_cpu, "cuda")
    per_expert = expert_bytes(layer_cpu, model)
    del layer_cpu, source_cpu
    baseline = TorchBf16(source, model)
    chain = [experts] + [layer_copy(experts) for _ in range(CHAIN - 1)] if min(tokens) <= CHAIN_MAX_T else []
    print(f"# {name}: {model.target}, layer on the GPU in {time.time() - t0:.0f} s", file=sys.stderr)
    routing, act = model.routing, model.activation
    stored = prepare(experts)
    for T in tokens:
        x = torch.randn(T, model.hidden, device="cuda", dtype=torch.bfloat16)
        logits = router_logits(name, model, T)
        cfg = call_config(stored, x, routing.top_k, act)
        r = route_kernel(logits, routing, cfg.route_block_m)
        touched = torch.unique(r.topk_ids).numel() * per_expert
        out = fused_moe(x, logits, routing, experts, act)
        ref = experts_reference(x.float(), r.topk_weights, r.topk_ids.long(), source, act)
        row = dict(
            model=name, target=model.target, T=T,
            route_us=timed_us(lambda: route_kernel(logits, routing, cfg.route_block_m)),
            torch_route_us=timed_us(lambda: torch_routing_chain(logits, routing, model.experts)),
            moe_us=timed_us(lambda: fused_moe(x, logits, routing, experts, act)),
            bf16_us=timed_us(lambda: baseline(x, logits), graph=baseline.grouped),
            touched_mb=touched / 1e6,
            err=rel_err(out, ref),
            bf16_err=rel_err(baseline(x, logits), ref),
            config=asdict(cfg),
        )
        row["gbps"] = touched / row["moe_us"] / 1e3
        row["pct_copy"] = 100 * row["gbps"] / copy
        if T <= CHAIN_MAX_T:
            row["model_us"] = timed_us(lambda: in_model(x, logits, routing, chain, act)) / CHAIN
            row["pct_copy_model"] = row["pct_copy"] * row["moe_us"] / row["model_us"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del ref


def layer_copy(layer):
    """The same layer in new memory: a chain's layers must not find each other's weights in L2."""
    return replace(layer, tensors={role: t.clone() for role, t in layer.tensors.items()})


def in_model(x: torch.Tensor, logits: torch.Tensor, routing: Routing, layers: list, act: Activation) -> torch.Tensor:
    """The layers one after the other, as a model runs them: each one's output is the next one's input."""
    for layer in layers:
        x = fused_moe(x, logits, routing, layer, act)
    return x


def breakdown_model(name: str, model: Model, layer_cpu, tokens, rows: list) -> None:
    experts = layer_to(layer_cpu, "cuda")
    for T in tokens:
        x = torch.randn(T, model.hidden, device="cuda", dtype=torch.bfloat16)
        logits = router_logits(name, model, T)
        fn = lambda: fused_moe(x, logits, model.routing, experts, model.activation)  # noqa: E731
        span, parts = kernel_breakdown(fn)
        rows.append(dict(model=name, T=T, moe_us=timed_us(fn), span_us=span, kernels=parts))
        print(json.dumps(rows[-1]), file=sys.stderr)


def print_breakdown(rows: list) -> None:
    one = torch.zeros(8, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"a graph of one tiny kernel times {timed_us(lambda: one.add_(1)):.1f} us the same way (the floor)")
    print("| model | T | moe us | flush end to last kernel end, us | kernels: +gap duration (us) |")
    print("|---|---|---|---|---|")
    for r in rows:
        kernels = ", ".join(f"{gap:+.1f} {k} {dur:.1f}" for k, gap, dur in r["kernels"])
        print(f"| {r['model']} | {r['T']} | {r['moe_us']:.1f} | {r['span_us']:.1f} | {kernels} |")


# ---- tuning ------------------------------------------------------------------------------
# (block_n, block_k, num_warps, num_stages) swept per GEMM, without and (SWAP_*) with the weights as
# the MMA's first operand; split-K choices for the down projection
ONE_ROW_TILES = [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (16, 512, 4, 2), (64, 256, 8, 3)]
DECODE_TILES = [(32, 64, 4, 4), (64, 64, 4, 4), (32, 128, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 256, 4, 2),
                (128, 128, 8, 3), (32, 256, 4, 3), (64, 64, 4, 5), (128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3),
                (128, 128, 4, 3)]
SWAP_DECODE_TILES = [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4), (64, 64, 4, 4), (128, 64, 4, 4),
                     (128, 128, 4, 3), (32, 256, 4, 3), (64, 256, 4, 2)]
PREFILL_TILES = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4), (64, 64, 8, 3),
                 (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 8, 3), (128, 32, 8, 4),
                 (128, 128, 8, 4), (64, 128, 8, 4)]
SWAP_PREFILL_TILES = [(64, 64, 4, 3), (64, 64, 4, 4), (32, 64, 4, 3), (64, 32, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3),
                      (128, 64, 8, 3), (256, 64, 8, 3), (128, 32, 4, 4)]
DECODE_SPLITS = (1, 2, 4, 8)
# (warps, k_warps, stages) of the CUDA decode GEMMs (up to 8 rows per expert on average)
MMA_GEMMS = [(8, 8, 2), (8, 8, 3), (8, 8, 4), (4, 4, 2), (4, 4, 3), (4, 4, 4), (8, 4, 3), (8, 4, 4), (8, 2, 3),
             (8, 2, 4), (4, 2, 3), (4, 2, 4), (4, 1, 2), (4, 1, 3), (4, 1, 4), (8, 1, 2), (8, 1, 4)]
MMA_SPLITS = (0, 1, 2, 4, 8)  # w2 CTAs along K (0: mma_decode.w2_split's choice)
MMA = "mma"  # the key of their block size in the tuner's tables
FAMILIES = ("one_row", "plain", "swap", "mma", "current")  # what --tune sweeps (--families)


def _fits(bm: int, tile: tuple, gemm: str) -> bool:
    """At most 128 fp32 accumulator registers per thread (w13's accumulator stacks gate and up: 2 x block_n)."""
    bn, _, warps, _ = tile
    return bm == 1 or bm * bn * (2 if gemm == "w13" else 1) <= 128 * 32 * warps


def _candidates(T: int, model: Model, stored, families=FAMILIES):
    """(block_m, gemm, GemmConfig) to sweep for one batch size: the tile families asked for and
    the configuration ``pick`` makes now ("current"), so that every sweep measures it too."""
    per_expert = T * model.routing.top_k / model.experts
    if per_expert < 24:
        bms = ([1] if per_expert <= 2 else []) + [16] + ([32] if per_expert >= 8 else [])
    else:
        bms = [bm for bm in (32, 64, 128, 256) if bm <= 2 * per_expert][-3:]
    for bm in bms:
        if bm == 1:
            sets = [(ONE_ROW_TILES, "one_row")]
        elif bm <= 32:
            sets = [(DECODE_TILES, "plain"), (SWAP_DECODE_TILES, "swap")]
        else:
            sets = [(PREFILL_TILES, "plain"), (SWAP_PREFILL_TILES, "swap")]
        w2_splits = DECODE_SPLITS if bm <= 16 else (1, 2) if bm == 32 else (1,)
        splits = {"w13": DECODE_SPLITS if bm <= 16 else (1,), "w2": w2_splits}
        for tiles, family in sets:
            if family not in families:
                continue
            for tile in tiles:
                g = GemmConfig(*tile, swap_ab=family == "swap")
                for gemm in ("w13", "w2"):
                    if _fits(bm, tile, gemm):
                        for split in splits[gemm]:
                            yield bm, gemm, replace(g, split_k=split)
    if "mma" in families and per_expert <= 8 and mma_decode.built():
        for f in MMA_GEMMS:
            yield MMA, "w13", MmaGemm(*f)
            for split in MMA_SPLITS:
                yield MMA, "w2", MmaGemm(*f, split=split)
    if "current" in families:  # with the Triton GEMMs that stand in where the CUDA ones do not apply
        cfg = pick_config(stored, T, model.routing.top_k, torch.device("cuda"))
        if cfg.mma is not None:
            yield MMA, "w13", cfg.mma.w13
            yield MMA, "w2", cfg.mma.w2
        yield cfg.block_m, "w13", cfg.w13
        yield cfg.block_m, "w2", cfg.w2


def _fitted(stored, T: int, routing: Routing, bm, g) -> MoEConfig:
    if bm == MMA:
        return MoEConfig(mma_decode.BLOCK_M, GemmConfig(64, 64, 4, 3), GemmConfig(64, 64, 4, 3), "cuda_mma_decode",
                         MmaDecode(g, g))
    return fit(MoEConfig(bm, g, g), T, routing.top_k, stored.experts, stored.hidden, stored.inter, torch.device("cuda"),
               (stored.w13.group_size, stored.w2.group_size), split_k=g.split_k or None)


def _placeholders(obj):
    """The layer with every tensor replaced by (shape, dtype): what a compile worker needs."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if is_dataclass(obj):
        return replace(obj, **{f.name: _placeholders(getattr(obj, f.name)) for f in fields(obj)})
    return obj


def _materialised(obj):
    """Zero tensors in place of :func:`_placeholders`' descriptions: enough to compile and launch
    every kernel."""
    if isinstance(obj, tuple) and obj and obj[0] == "tensor":
        return torch.zeros(obj[1], dtype=obj[2], device="cuda")
    if is_dataclass(obj):
        return replace(obj, **{f.name: _materialised(getattr(obj, f.name)) for f in fields(obj)})
    return obj


_WORKER_LAYERS: dict = {}


def _compile_job(model_name: str, shape_only, bm: int, gemm: str, cfg: MoEConfig) -> Optional[str]:
    """Compile one GEMM configuration in a worker process, by launching it once on a few tokens
    (the kernels do not specialise on the batch size); the error if it fails."""
    try:
        stored = _WORKER_LAYERS.get(model_name)
        if stored is None:
            stored = _WORKER_LAYERS[model_name] = _materialised(shape_only)
        model, T = MODELS[model_name], 16
        x = torch.randn(T, model.hidden, device="cuda", dtype=torch.bfloat16)
        r = route_kernel(torch.randn(T, model.experts, device="cuda", dtype=torch.bfloat16), model.routing, bm)
        h = torch.zeros(T * model.routing.top_k, model.inter, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(T, model.hidden, device="cuda", dtype=torch.bfloat16)
        if gemm == "w13":
            launch_w13(stored, x, r, h, out, model.activation, cfg)
        else:
            launch_w2(stored, h, r, out, cfg)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # reported, and the configuration skipped
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def warm(pool: ProcessPoolExecutor, built: dict, tokens) -> None:
    """Start compiling, in the pool's processes, the GEMMs that the table's layers will run."""
    submitted = set()
    for name, (layer_cpu, _) in built.items():
        model, stored = MODELS[name], prepare(layer_cpu)
        shape_only = _placeholders(stored)
        for T in tokens:
            cfg = pick_config(stored, T, model.routing.top_k, torch.device("cuda"))
            for gemm in ("w13", "w2"):
                key = (name, cfg.block_m, gemm, getattr(cfg, gemm))
                if key not in submitted:
                    submitted.add(key)
                    pool.submit(_compile_job, name, shape_only, cfg.block_m, gemm, cfg)


def tune(names, tokens, jobs: int, deadline_s: float, results: list, log: Optional[Path], families=FAMILIES) -> None:
    """Sweep every candidate of every (model, T), largest T first: compile them all in ``jobs``
    worker processes (Triton's cache is on disk, shared), then time each GEMM alone, serially, with
    the L2 flushed; stop starting new (model, T) once ``deadline_s`` has passed."""
    start = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        layers, sources, compiles = {}, {}, {}
        for name in names:
            layer_cpu, source_cpu = build(MODELS[name])
            layers[name], sources[name] = prepare(layer_to(layer_cpu, "cuda")), linears_to(source_cpu, "cuda")
        work = sorted(((T, name) for name in names for T in tokens), key=lambda p: -p[0])
        for T, name in work:
            stored, model = layers[name], MODELS[name]
            shape_only = _placeholders(stored)
            for bm, gemm, g in _candidates(T, model, stored, families):
                if bm == MMA:  # compiled with moeprep
                    continue
                cfg = _fitted(stored, T, model.routing, bm, g)
                key = (name, bm, gemm, cfg.w13 if gemm == "w13" else cfg.w2)
                if key not in compiles:
                    compiles[key] = pool.submit(_compile_job, name, shape_only, bm, gemm, cfg)
        print(f"# {len(compiles)} kernels to compile; layers built in {time.time() - start:.0f} s", file=sys.stderr)
        for T, name in work:
            if time.time() - start > deadline_s:
                print(f"# deadline: {name} T={T} not tuned", file=sys.stderr)
                continue
            t0 = time.time()
            results.append(_tune_one(name, MODELS[name], layers[name], sources[name], T, compiles, families))
            results[-1]["tune_s"] = round(time.time() - t0, 1)
            print(json.dumps({k: v for k, v in results[-1].items() if k != "top"}), file=sys.stderr)
            if log:
                log.write_text(json.dumps(results, indent=1))
        pool.shutdown(cancel_futures=True)


def _compile_error(compiles: dict, key: tuple) -> Optional[str]:
    try:
        err = compiles[key].result()
    except Exception as exc:  # the worker died
        err = f"{type(exc).__name__}: {exc}"
    if err and not getattr(compiles[key], "reported", False):
        compiles[key].reported = True
        print(f"#   {key}: {err}", file=sys.stderr)
    return err


def _references(x: torch.Tensor, h: torch.Tensor, r, source, act: Activation):
    """fp32 references of each GEMM alone: the gate/up GEMM's h from x, the down GEMM's output from h."""
    ids, k = r.topk_ids.long(), r.topk_ids.shape[1]
    h_ref = torch.zeros(h.shape, device=h.device)
    out_ref = torch.zeros(x.shape, device=x.device)
    for e in torch.unique(ids).tolist():
        tokens, slot = torch.where(ids == e)
        pairs = tokens * k + slot
        h_ref[pairs] = expert_hidden(x[tokens].float(), source[e], act)
        out_ref.index_add_(0, tokens, expert_down(h[pairs].float(), source[e]) * r.topk_weights[tokens, slot, None])
    return h_ref, out_ref


def _tune_one(name: str, model: Model, stored, source, T: int, compiles: dict, families) -> dict:
    """The fastest configuration of one (model, T), from the candidates whose results match the
    fp32 reference (each GEMM is checked once, on poisoned buffers, besides being timed).

    The CUDA down GEMM starts while the gate/up GEMM runs (a programmatic dependent launch), so
    its candidates are timed behind the fastest CUDA gate/up GEMM: its time is the pair's less
    that GEMM's alone."""
    x = torch.randn(T, model.hidden, device="cuda", dtype=torch.bfloat16)
    logits = router_logits(name, model, T)
    h = torch.randn(T * model.routing.top_k, model.inter, device="cuda", dtype=torch.bfloat16)
    h13 = torch.empty_like(h)
    out = torch.empty(T, model.hidden, device="cuda", dtype=torch.bfloat16)
    timings: dict = {}  # bm -> gemm -> [(us, GemmConfig)]
    routed, refs, rejected, seen = {}, None, [], set()
    behind_w13 = []  # the CUDA down GEMM's candidates
    for bm, gemm, g in _candidates(T, model, stored, families):
        cfg = _fitted(stored, T, model.routing, bm, g)
        if bm != MMA:
            g = cfg.w13 if gemm == "w13" else cfg.w2
        if (bm, gemm, g) in seen or (bm != MMA and _compile_error(compiles, (name, bm, gemm, g))):
            continue
        seen.add((bm, gemm, g))
        if bm not in routed:
            routed[bm] = route_kernel(logits, model.routing, cfg.route_block_m)
        r = routed[bm]
        if refs is None:
            refs = _references(x, h, r, source, model.activation)
        if gemm == "w13":
            def run():
                if bm == MMA:
                    mma_decode.launch_w13(stored, x, r, h13, out, model.activation, cfg.mma)
                else:
                    launch_w13(stored, x, r, h13, out, model.activation, cfg)
            h13.fill_(float("nan"))
            run()
            err = rel_err(h13, refs[0])
        else:
            def run():
                if bm == MMA:
                    mma_decode.launch_w2(stored, h, r, out, cfg.mma)
                else:
                    launch_w2(stored, h, r, out, cfg)
            out.zero_()
            run()
            err = rel_err(out, refs[1])
        if not err <= 1e-2:  # NaN included
            rejected.append(dict(block_m=bm, gemm=gemm, config=asdict(g), err=err))
            print(f"#   wrong results, rejected: {name} T={T} block_m={bm} {gemm} {g}: error {err:.2e}", file=sys.stderr)
            continue
        if bm == MMA and gemm == "w2":
            behind_w13.append(g)
            continue
        us = timed_us(run, rep_ms=25)  # from a CUDA graph: small GEMMs take less than a launch from Python
        timings.setdefault(bm, {}).setdefault(gemm, []).append((us, g))
    if behind_w13 and "w13" in timings.get(MMA, {}):
        us13, g13 = min(timings[MMA]["w13"], key=lambda p: p[0])
        r = routed[MMA]
        for g in behind_w13:
            def pair(mma=MmaDecode(g13, g)):
                mma_decode.launch_w13(stored, x, r, h13, out, model.activation, mma)
                mma_decode.launch_w2(stored, h, r, out, mma)
            timings[MMA].setdefault("w2", []).append((timed_us(pair, rep_ms=25) - us13, g))
    fastest = {bm: (min(t["w13"], key=lambda p: p[0]), min(t["w2"], key=lambda p: p[0]))
               for bm, t in timings.items() if "w13" in t and "w2" in t}
    mma = fastest.pop(MMA, None)
    if not fastest:
        return dict(model=name, T=T, error="no candidate compiled")
    bm = min(fastest, key=lambda b: fastest[b][0][0] + fastest[b][1][0])
    (us13, c13), (us2, c2) = fastest[bm]
    both, r = MoEConfig(bm, c13, c2), routed[bm]
    pair_us = timed_us(lambda: (launch_w13(stored, x, r, h13, out, model.activation, both),  # as the CUDA pair is timed
                                launch_w2(stored, h, r, out, both)), rep_ms=25)
    top = {bm: {gemm: [(round(us, 1), asdict(c)) for us, c in sorted(v, key=lambda p: p[0])[:4]] for gemm, v in t.items()}
           for bm, t in timings.items()}
    current = {}  # the times of the configuration pick makes now (CUDA decode GEMMs: "mma_w13", "mma_w2")
    for b, gemm, g in _candidates(T, model, stored, ["current"]):
        now = g if b == MMA else getattr(_fitted(stored, T, model.routing, b, g), gemm)
        key = f"mma_{gemm}" if b == MMA else gemm
        current[key] = next((round(us, 1) for us, c in timings.get(b, {}).get(gemm, []) if c == now), None)
    row = dict(model=name, T=T, block_m=bm, w13=asdict(c13), w13_us=us13, w2=asdict(c2), w2_us=us2, pair_us=pair_us,
               top=top, current_us=current, rejected=rejected)
    if mma is not None:  # the CUDA decode GEMMs' best, which take over if faster
        row["mma"] = dict(w13=asdict(mma[0][1]), w13_us=mma[0][0], w2=asdict(mma[1][1]), w2_us=mma[1][0])
    return row


def tuned_entries(rows: list) -> dict:
    """The sweep's winners, per benchmark model: [(T, MoEConfig)], the CUDA decode GEMMs named where
    their pair beat the Triton pair (both timed in one graph)."""
    found: dict = {}
    for r in sorted((r for r in rows if "error" not in r), key=lambda r: (r["model"], r["T"])):
        m = r.get("mma")
        use = m is not None and m["w13_us"] + m["w2_us"] < r["pair_us"]
        mma = MmaDecode(MmaGemm(**m["w13"]), MmaGemm(**m["w2"])) if use else None
        cfg = MoEConfig(r["block_m"], GemmConfig(**r["w13"]), GemmConfig(**r["w2"]),
                        "cuda_mma_decode" if use else "triton", mma)
        found.setdefault(r["model"], []).append((r["T"], cfg))
    return found


def write_tuned(rows: list, write: bool) -> None:
    """Print the sweep's winners as tuned-table entries of this GPU; with ``write``, merge them into
    its table (moeprep/kernels/tuned/<device>.json): an entry at a swept T is replaced, except that
    one naming the CUDA prefill GEMMs keeps that backend (the sweep times the Triton GEMMs that stand
    in for them, not the CUDA prefill GEMMs themselves: scripts/compare_prefill.py decides those)."""
    device = torch.cuda.get_device_name()
    table = configs.tuned_table(device) or configs.TunedTable(device, source="scripts/bench_moe.py --tune")
    for name, swept in tuned_entries(rows).items():
        m = MODELS[name]
        problem = configs.Problem("mxfp4" if m.target.startswith("mxfp4") else "int4", m.experts, m.hidden, m.inter,
                                  m.routing.top_k, m.group)
        entries = dict(table.entries.get(problem, []))
        for T, cfg in swept:
            if entries.get(T) is not None and entries[T].backend == "cuda_wgmma_prefill" and cfg.backend == "triton":
                cfg = replace(cfg, backend="cuda_wgmma_prefill")
            entries[T] = cfg
            print(json.dumps({"model": name, **configs.config_to_json(T, cfg)}))
        table.entries[problem] = sorted(entries.items())
        table.models[problem] = name
    if write:
        path = configs.table_path(device)
        path.write_text(json.dumps(configs.table_to_json(table), indent=1) + "\n")
        print(f"# wrote {path}", file=sys.stderr)


def print_table(rows: list, copy: float) -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"device-to-device copy {copy:.0f} GB/s (read + written)")
    head = ["model", "target", "T", "route us", "torch route us", "speedup", "moe us", "bf16 us", "moe/bf16",
            "touched MB", "GB/s", "%copy", "in model us", "%copy in model", "err", "bf16 err"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['model']} | {r['target']} | {r['T']} | {r['route_us']:.1f} | {r['torch_route_us']:.1f} | "
              f"{r['torch_route_us'] / r['route_us']:.1f}x | {r['moe_us']:.1f} | {r['bf16_us']:.1f} | "
              f"{r['moe_us'] / r['bf16_us']:.2f} | {r['touched_mb']:.0f} | {r['gbps']:.0f} | {r['pct_copy']:.0f}% | "
              + (f"{r['model_us']:.1f} | {r['pct_copy_model']:.0f}% | " if "model_us" in r else "- | - | ")
              + f"{r['err']:.1e} | {r['bf16_err']:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated batch sizes T")
    p.add_argument("--tune", action="store_true", help="sweep tile configurations instead of the table")
    p.add_argument("--breakdown", action="store_true",
                   help="instead of the table: each kernel's time and the gaps between them inside the layer's graph")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                   help="processes compiling the kernels in parallel ahead of the timings")
    p.add_argument("--deadline", type=float, default=1e9, help="--tune: seconds after which no new (model, T) starts")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"--tune: tile families to sweep, from {', '.join(FAMILIES)}")
    p.add_argument("--write", action="store_true", help="--tune: merge the winners into this GPU's tuned table")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    rows: list = []
    if args.tune:
        tune(args.models.split(","), tokens, args.jobs, args.deadline, rows, args.json, args.families.split(","))
        write_tuned(rows, args.write)
    elif args.breakdown:
        for name in args.models.split(","):
            breakdown_model(name, MODELS[name], build(MODELS[name])[0], tokens, rows)
            torch.cuda.empty_cache()
        print_breakdown(rows)
    else:
        names = args.models.split(",")
        built = {name: build(MODELS[name]) for name in names}
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            warm(pool, built, tokens)
            copy = copy_gbps()
            for name in names:
                bench_model(name, MODELS[name], *built.pop(name), tokens, copy, rows)
                torch.cuda.empty_cache()
        print_table(rows, copy)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
