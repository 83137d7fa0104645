#!/usr/bin/env python3
"""Compile-check the Triton kernels of the AMD path, no GPU needed.

Runs the fused MoE layer (routing and both grouped GEMMs, as ``moeprep.kernels.fused.fused_moe``
launches them on ROCm) for the benchmark models' shapes and batch sizes, with the configurations
an AMD GPU would take (the AMD heuristic, its split-K fitted to that GPU's compute units), but with
a stand-in Triton driver that names an AMD target and compiles each kernel instead of launching
it. The Triton wheel on PyPI carries the AMD backend. Prints, per kernel and configuration, the
registers, LDS and spills the compiler reports, and exits 1 if any kernel fails to compile.

    python scripts/check_amd.py [--archs gfx942,gfx950,gfx1100,gfx1151] [--tokens 1,16,512,8192]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # kernel_layers: random stored layers

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from kernel_layers import random_layer  # noqa: E402
from moeprep.kernels import configs, fused  # noqa: E402
from moeprep.moe import Activation, Routing  # noqa: E402

# arch: (wave size, compute units of the GPU it stands for)
ARCHS = {"gfx942": (64, 304), "gfx950": (64, 256), "gfx1100": (32, 96), "gfx1151": (32, 40)}
# The benchmark models (scripts/bench_moe.py's shapes), scaled down in experts where that changes
# no kernel (the expert count is a runtime argument): target, experts, hidden, inter, routing, act, bias, group
MODELS = {
    "qwen3-30b-a3b": ("w4a16_preshuffle", 16, 2048, 768, Routing("softmax_topk", 8, True, True), Activation("silu"), False, 32),
    "qwen3-30b-a3b-zp": ("w4a16_preshuffle_zp", 16, 2048, 768, Routing("softmax_topk", 8, True, True), Activation("silu"),
                         False, 128),
    "gpt-oss-120b": ("mxfp4_preshuffle", 8, 2880, 2880, Routing("topk_softmax", 4, False),
                     Activation("swiglu_oai", 1.702, 7.0), True, 32),
    "mixtral-8x7b": ("w4a16_preshuffle", 8, 4096, 14336, Routing("softmax_topk", 2, True), Activation("silu"), False, 32),
    "gpt-oss-mxfp4_moe": ("mxfp4_moe", 8, 2048, 768, Routing("topk_softmax", 4, False), Activation("swiglu_oai"), True, 32),
    # the families of ARCHITECTURES.md; DeepSeek's routing kernel with its group limit (8 groups, the best 4)
    "qwen3.5-35b-a3b": ("w4a16_preshuffle", 16, 2048, 512, Routing("softmax_topk", 8, True), Activation("silu"), False, 32),
    "deepseek-v3": ("w4a16_preshuffle", 16, 7168, 2048, Routing("noaux_tc", 8, True, n_group=8, topk_group=4, scaling=2.5),
                    Activation("silu"), False, 32),
    "glm-4.5": ("w4a16_preshuffle_zp", 16, 5120, 1536, Routing("noaux_tc", 8, True, scaling=2.5), Activation("silu"), False, 32),
}


class CompileOnly:
    """A stand-in for Triton's active driver: an AMD target, and no device to launch on."""

    def __init__(self, arch: str, wave: int):
        self.target = GPUTarget("hip", arch, wave)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return list(ARCHS).index(self.target.arch)  # a device id per arch keeps Triton's caches apart

    def get_current_stream(self, device=None):
        return 0


COMPILED: list = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _real_run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((self.fn.__name__, kwargs, kernel))
    return kernel


_real_run = JITFunction.run


def _facts(kernel) -> dict:
    asm = kernel.asm.get("amdgcn", "")

    def count(key: str) -> int:
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        return int(m[1]) if m else -1

    return {"vgpr": count("vgpr_count"), "sgpr": count("sgpr_count"), "vgpr_spill": count("vgpr_spill_count"),
            "sgpr_spill": count("sgpr_spill_count"), "lds": kernel.metadata.shared}


def check(arch: str, tokens: list[int]) -> list[dict]:
    wave, cus = ARCHS[arch]
    triton_driver.set_active(CompileOnly(arch, wave))
    configs._programs_wanted = lambda device: 4 * cus  # split-K sized for this GPU, as on it
    configs.vendor = lambda device: "amd"  # and fitted by AMD's rules
    rows, seen = [], set()
    for name, (target, E, H, I, routing, act, bias, group) in MODELS.items():
        layer, _ = random_layer(target, E, H, I, group_size=group, bias=bias, seed=0)
        for T in tokens:
            cfg = configs.heuristic("amd", T, routing.top_k, E)
            x = torch.zeros(T, H, dtype=torch.bfloat16)
            logits = torch.zeros(T, E, dtype=torch.bfloat16)
            COMPILED.clear()
            error = None
            try:
                fused.fused_moe(x, logits, routing, layer, act, config=cfg)
            except Exception as exc:  # a kernel that does not compile for this target
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            if error:
                rows.append(dict(arch=arch, model=name, T=T, kernel="?", config="", error=error))
                continue
            for kernel_name, kwargs, kernel in COMPILED:
                const = ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if k.isupper() or k.startswith("num_"))
                key = (kernel_name, const)
                if key not in seen:
                    seen.add(key)
                    rows.append(dict(arch=arch, model=name, T=T, kernel=kernel_name, config=const, **_facts(kernel)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--tokens", default="1,16,512,8192")
    args = p.parse_args()
    JITFunction.run = _compile_only
    tokens = [int(t) for t in args.tokens.split(",")]
    start, rows = time.time(), []
    for arch in args.archs.split(","):
        rows += check(arch, tokens)
    print(f"triton {triton.__version__}; {len(rows)} kernels compiled in {time.time() - start:.0f} s")
    print("| arch | model | T | kernel | vgpr | sgpr | spills (v/s) | LDS bytes | constants |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = [r for r in rows if "error" in r]
    for r in rows:
        if "error" in r:
            print(f"| {r['arch']} | {r['model']} | {r['T']} | FAILED | | | | | {r['error']} |")
        else:
            print(f"| {r['arch']} | {r['model']} | {r['T']} | {r['kernel']} | {r['vgpr']} | {r['sgpr']} | "
                  f"{r['vgpr_spill']}/{r['sgpr_spill']} | {r['lds']} | {r['config']} |")
    if failed:
        sys.exit(f"check_amd: {len(failed)} of {len(rows)} failed to compile")
    print(f"check_amd: OK, every kernel compiles for {args.archs}")


if __name__ == "__main__":
    main()
