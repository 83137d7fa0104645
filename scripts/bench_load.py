"""Time to a ready MoE model, and peak memory: a converted checkpoint against its source with the
transform a runtime applies at load.

Builds a Qwen3-30B-A3B-shaped AWQ checkpoint (128 experts, hidden 2048, expert width 768; 16 layers
are about 5 GB; bench_convert.py's builder), converts it with ``moeprep convert``
(``w4a16_preshuffle_zp``), then in one run, each in a fresh process from a warm page cache:

- ``converted``: ``moeprep.load`` and every MoE layer's stored expert tensors on the device, as they
  are (tagged ``is_shuffled``), which is what the vLLM plugin and the transformers quantizer load;
- ``source + transform``: the source's per-expert AWQ tensors read, unpacked, repacked and shuffled
  into the same layout in torch on the device, expert by expert (the permute formulation aiter's
  ``shuffle_weight`` uses, after the unpacking vLLM's loaders do), gate and up stacked;
- ``read only``: the same expert bytes of the source copied to the device with no transform (the
  limit of the disk, the page cache and the host-to-device copy).

Only the experts differ between the two paths (attention and embeddings load identically), so
only they are loaded. Peak RSS is the child's VmHWM; peak device memory is torch's.

    python scripts/bench_load.py [--layers 16] [--device cpu|cuda] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import build, timed  # noqa: E402
from bench_shuffle import torch_codes_from, torch_repack  # noqa: E402

TARGET = "w4a16_preshuffle_zp"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _place(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor in the engine's own memory, as a loader copies it into its parameters (on the CPU
    too: a memory map that is never read would make any load look free)."""
    return t.to(device, copy=True)


def load_converted(path: Path, device: torch.device) -> list:
    import moeprep

    loaded = moeprep.load(str(path), "cpu")
    return [{role: _place(t, device) for role, t in loaded.experts(i).tensors.items()} for i in loaded.moe_layer_indices()]


def _source_experts(path: Path, layers: int | None = None):
    """Per MoE layer: per projection, the experts' AWQ tensors (mapped, not read yet)."""
    from moeprep.io.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    layers = layers or int(ckpt.config["num_hidden_layers"])
    experts = int(ckpt.config["num_local_experts"])
    for i in range(layers):
        p = f"model.layers.{i}.mlp.experts"
        yield {proj: [{part: ckpt.get_tensor(f"{p}.{e}.{proj}.{part}") for part in ("qweight", "qzeros", "scales")}
                      for e in range(experts)] for proj in ("gate_proj", "up_proj", "down_proj")}


def _transformed(path: Path, device: torch.device, layers: int | None = None) -> list:
    done = []
    for layer in _source_experts(path, layers):
        out = {}
        for name, projs in (("w13", ("gate_proj", "up_proj")), ("w2", ("down_proj",))):
            per_expert = [[layer[proj][e] for proj in projs] for e in range(len(layer[projs[0]]))]
            k = per_expert[0][0]["qweight"].shape[0]
            n = sum(t["qweight"].shape[1] * 8 for t in per_expert[0])
            weight = torch.empty((len(per_expert), n, k // 2), dtype=torch.uint8, device=device)
            words = [torch.cat([_place(t["qweight"], device) for t in parts], dim=1) for parts in per_expert]
            torch_repack(weight, words, "awq_int32", signed=False)
            out[f"{name}_weight"] = weight
            out[f"{name}_weight_scale"] = torch.stack(
                [torch.cat([_place(t["scales"], device) for t in parts], dim=1).t().to(torch.bfloat16) for parts in per_expert])
            out[f"{name}_weight_zero_point"] = torch.stack(
                [torch.cat([torch_codes_from(_place(t["qzeros"], device), "awq_int32") for t in parts]) for parts in per_expert])
        done.append(out)
    return done


def load_source_transformed(path: Path, device: torch.device) -> list:
    return _transformed(path, device)


def load_source_bytes(path: Path, device: torch.device) -> list:
    return [{proj: [{part: _place(t, device) for part, t in e.items()} for e in experts] for proj, experts in layer.items()}
            for layer in _source_experts(path)]


def check_same_weights(src: Path, out: Path) -> None:
    """The transform at load produces the converted checkpoint's stored weights, byte for byte
    (first layer), so both paths end in the same bytes."""
    import moeprep

    stored = moeprep.load(str(out)).experts(0).tensors
    made = _transformed(src, torch.device("cpu"), layers=1)[0]
    for role in ("w13_weight", "w2_weight"):
        if not torch.equal(stored[role].as_subclass(torch.Tensor), made[role]):
            raise SystemExit(f"the torch transform does not produce the converted {role}")


MODES = {"converted": load_converted, "source + transform": load_source_transformed, "read only": load_source_bytes}


def child(mode: str, path: Path, device: str) -> None:
    dev = torch.device(device)
    start = time.perf_counter()
    ready = MODES[mode](path, dev)
    _sync(dev)
    secs = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    print(json.dumps({"seconds": secs, "device_peak": peak, "layers": len(ready)}))


def run(mode: str, path: Path, source: Path, device: str) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--device", device, "--result", str(out)]
    wall, rss = timed(cmd, source, cold=False)
    result = json.loads(out.read_text())
    out.unlink()
    return {**result, "wall": wall, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            child(args.child, Path(args.path), args.device)
        Path(args.result).write_text(buf.getvalue().strip().splitlines()[-1])
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = build(Path(tmp) / "src", "awq", args.layers, 128, 2048, 768)
        out = Path(tmp) / "out"
        subprocess.run([sys.executable, "-m", "moeprep", "convert", str(src), str(out), "--target", TARGET, "-q"], check=True)
        check_same_weights(src, out)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"Qwen3-30B-A3B-shaped AWQ, {args.layers} MoE layers, {size / 1e9:.2f} GB; device {args.device}; warm page cache")
        print(f"{'load':<22}{'ready (s)':>10}{'process (s)':>13}{'peak RSS (GB)':>15}{'peak device (GB)':>18}")
        for mode in MODES:
            path = out if mode == "converted" else src
            r = run(mode, path, path, args.device)
            print(f"{mode:<22}{r['seconds']:>10.2f}{r['wall']:>13.2f}{r['rss'] / 1e9:>15.2f}{r['device_peak'] / 1e9:>18.2f}")


if __name__ == "__main__":
    main()
