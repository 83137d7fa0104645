"""Benchmark ``moeprep convert`` on a synthetic checkpoint of realistic MoE shapes.

Builds, in a temporary directory, a checkpoint with Qwen3-30B-A3B-like MoE layers (128 experts,
hidden 2048, expert intermediate 768, by default 16 layers: about 5 GB) in one source format,
then reports in one run: the conversion's wall time, ``cp -r`` of the same files (the disk and
page-cache limit), throughput, and the conversion's peak RSS as the OS measured it
(``ru_maxrss`` of the child process). Finally it checks the output with ``moeprep verify``.

    python scripts/bench_convert.py [--layers 16] [--format awq|ct_int4|gptq|quark_mxfp4] [--workers 1]

Codes and scales are random (the conversion does not care about values), written with numpy,
so building the source takes seconds, not a quantizer run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moeprep.io.safetensors_writer import SafetensorsWriter, TensorSpec

FORMATS = {
    # name: (quantization_config, per-expert-projection tensors builder)
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    "ct_int4": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True, "actorder": None}}},
    },
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "checkpoint_format": "gptq"},
    "quark_mxfp4": {
        "quant_method": "quark", "export": {"weight_format": "real_quantized", "pack_method": "reorder"},
        "global_quant_config": {"weight": {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0"}},
    },
}


def projection_tensors(fmt: str, name: str, n: int, k: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The stored tensors of one [n, k] linear in ``fmt`` (names, dtypes, shapes)."""
    if fmt == "awq":
        g = k // 128
        return [(f"{name}.qweight", torch.int32, (k, n // 8)), (f"{name}.qzeros", torch.int32, (g, n // 8)), (f"{name}.scales", torch.float16, (g, n))]
    if fmt == "gptq":
        g = k // 128
        return [(f"{name}.qweight", torch.int32, (k // 8, n)), (f"{name}.qzeros", torch.int32, (g, n // 8)),
                (f"{name}.scales", torch.float16, (g, n)), (f"{name}.g_idx", torch.int32, (k,))]
    if fmt == "ct_int4":
        return [(f"{name}.weight_packed", torch.int32, (n, k // 8)), (f"{name}.weight_scale", torch.bfloat16, (n, k // 32)),
                (f"{name}.weight_shape", torch.int64, (2,))]
    return [(f"{name}.weight", torch.uint8, (n, k // 2)), (f"{name}.weight_scale", torch.uint8, (n, k // 32))]


def fill(spec: TensorSpec, rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    name = spec.name
    if name.endswith("g_idx"):
        return torch.arange(k, dtype=torch.int32) // 128
    if name.endswith("weight_shape"):
        return torch.tensor([n, k], dtype=torch.int64)
    if name.endswith("qzeros") and "gptq" in name:
        return torch.full(spec.shape, 0x77777777, dtype=torch.int32)
    dtype = getattr(torch, spec.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return (torch.from_numpy(rng.random(spec.shape, dtype=np.float32)) * 0.01 + 1e-3).to(dtype)
    if dtype == torch.uint8 and name.endswith("weight_scale"):
        return torch.from_numpy(rng.integers(118, 130, spec.shape, dtype=np.uint8))
    nbytes = spec.nbytes
    return torch.from_numpy(np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy()).view(dtype).reshape(spec.shape)


def build(root: Path, fmt: str, layers: int, experts: int, hidden: int, inter: int, seed: int = 0) -> Path:
    """A sharded checkpoint: one shard per layer, plus embeddings/norm/lm_head."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    vocab = 4096
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "moe_intermediate_size": inter, "num_local_experts": experts, "num_experts_per_tok": 8,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": vocab, "norm_topk_prob": True, "dtype": "bfloat16", "quantization_config": FORMATS[fmt],
    }
    (root / "config.json").write_text(json.dumps(config, indent=1))
    weight_map = {}
    total = 0
    n_shards = layers + 1
    for shard_i in range(n_shards):
        shard = f"model-{shard_i + 1:05d}-of-{n_shards:05d}.safetensors"
        specs: list[tuple[TensorSpec, int, int]] = []
        if shard_i < layers:
            p = f"model.layers.{shard_i}"
            specs.append((TensorSpec(f"{p}.mlp.gate.weight", torch.bfloat16, (experts, hidden)), 0, 0))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                specs.append((TensorSpec(f"{p}.{norm}.weight", torch.bfloat16, (hidden,)), 0, 0))
            for e in range(experts):
                for proj, (n, k) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                    for name, dtype, shape in projection_tensors(fmt, f"{p}.mlp.experts.{e}.{proj}", n, k):
                        specs.append((TensorSpec(name, dtype, shape), n, k))
        else:
            for name, shape in (("model.embed_tokens.weight", (vocab, hidden)), ("lm_head.weight", (vocab, hidden)), ("model.norm.weight", (hidden,))):
                specs.append((TensorSpec(name, torch.bfloat16, shape), 0, 0))
        writer = SafetensorsWriter(root / shard, [s for s, _, _ in specs], {"format": "pt"})
        for spec, n, k in specs:
            writer.write(spec.name, fill(spec, rng, n, k))
            weight_map[spec.name] = shard
            total += spec.nbytes
        writer.close()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return root


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm(path: Path) -> None:
    """Read every file once so the page cache holds the source."""
    for p in sorted(path.iterdir()):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def timed(cmd: list[str], source: Path, cold: bool) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, until what it wrote is on disk.

    Every operation starts from the same state: dirty pages flushed, then either the page cache
    dropped (``cold``: the source is read from disk; needs root) or the source read into it
    (warm). Each ends with ``sync`` inside the timing: ``cp -r`` leaves its bytes in the page
    cache, ``convert`` syncs what it publishes, and both are timed to the bytes being written.
    The peak is the child's own VmHWM (ru_maxrss would include the forked parent's memory).
    """
    os.sync()
    if cold:
        drop_caches()
    else:
        warm(source)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.01)
    os.sync()
    secs = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return secs, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=sorted(FORMATS), default="awq")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--target", default=None)
    ap.add_argument("--dir", default=None, help="where to build (default: a temp dir on the same disk as /tmp)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        src = build(tmp / "src", args.format, args.layers, args.experts, args.hidden, args.intermediate)
        size = du(src)
        print(f"built {args.format} source: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
        convert = [sys.executable, "-m", "moeprep", "convert", str(src), str(tmp / "out"), "--quiet", "--overwrite", "--workers", str(args.workers)]
        if args.target:
            convert += ["--target", args.target]
        rows = []
        for cold in ([True, False] if drop_caches() else [False]):
            cache = "cold" if cold else "warm"
            secs, rss = timed(["cp", "-r", str(src), str(tmp / "copy")], src, cold)
            shutil.rmtree(tmp / "copy")
            rows.append((f"cp -r, {cache} cache", secs, size, rss))
            secs, rss = timed(convert, src, cold)
            rows.append((f"moeprep convert, {cache} cache", secs, size, rss))
        v_start = time.perf_counter()
        verified = subprocess.run([sys.executable, "-m", "moeprep", "verify", str(src), str(tmp / "out"), "--quiet"]).returncode == 0
        v_secs = time.perf_counter() - v_start

    print(f"\nsource: {args.format}, {args.layers} layers x {args.experts} experts, H {args.hidden}, I {args.intermediate}; "
          f"{size / 1e9:.2f} GB; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}; workers {args.workers}")
    print(f"{'operation':<34} {'wall s':>8} {'GB/s':>8} {'peak RSS MB':>12}")
    for name, secs, nbytes, rss in rows:
        print(f"{name:<34} {secs:>8.2f} {nbytes / 1e9 / secs:>8.2f} {rss / 1e6:>12.0f}")
    for i in range(0, len(rows), 2):
        target = "1.0x" if "cold" in rows[i][0] else "1.5x"
        print(f"{rows[i + 1][0]}: {rows[i + 1][1] / rows[i][1]:.2f}x cp -r (target <= {target}); "
              f"peak RSS {rows[i + 1][3] / 1e9:.2f} GB (target < 1 GB)")
    print(f"verify: {'passed' if verified else 'FAILED'} in {v_secs:.1f} s, {v_secs / rows[-1][1]:.2f}x warm convert (target <= 1.5x)")


if __name__ == "__main__":
    main()
