"""``moeprep convert``: a quantized checkpoint into a preshuffled one, streamed and atomic.

The whole output is planned from headers first (every tensor's name, dtype, shape, shard and
metadata), so each shard's header is written before its data and each tensor is written once,
as soon as it exists. MoE layers are converted one at a time (``workers`` of them ahead at
most); every other tensor is copied byte for byte straight from the source file.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .errors import OutputError, TargetError, UnsupportedError
from .formats import detect
from .formats.base import torch_dtype
from .io.checkpoint import INDEX_NAME, Checkpoint
from .io.safetensors_writer import SafetensorsWriter, TensorSpec, header_bytes
from .model import ModelMap, build_model_map, layer_of, natural_key
from .targets import FORMAT_VERSION, PREFERENCE, TARGETS, LayerPlan, Target, get_target, layer_plan
from .targets.base import metadata_json

DEFAULT_MAX_SHARD = 5 * 1000**3
# Files that are other copies of the weights, never carried into the output.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")
_SKIP_FILES = {INDEX_NAME, "quantize_config.json"}
TMP_MARK = ".moeprep-tmp-"


@dataclass
class OutputTensor:
    spec: TensorSpec
    meta: Optional[dict] = None  # converted tensors: their layout metadata
    source: Optional[str] = None  # copied tensors: the source tensor name
    layer: Optional[int] = None  # converted tensors: the index into plan.layers


@dataclass
class Shard:
    file: str
    tensors: list[OutputTensor] = field(default_factory=list)


@dataclass
class ConversionPlan:
    model: ModelMap
    target: Target
    layers: list[LayerPlan]
    shards: list[Shard]
    config: dict

    @property
    def total_bytes(self) -> int:
        return sum(t.spec.nbytes for s in self.shards for t in s.tensors)


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``123`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise OutputError(f"invalid size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(value * units[unit])


def choose_target(model: ModelMap, name: Optional[str]) -> Target:
    """The requested target, refused before any work if it cannot hold the source exactly;
    or the first target of the format's preference list that can."""
    if model.ckpt.quantization_config.get("quant_method") == "moeprep":
        raise UnsupportedError(
            f"already converted by moeprep (target {model.ckpt.quantization_config.get('target')}); convert the original checkpoint instead",
            path=str(model.ckpt.root / "config.json"),
        )
    if not model.moe_layers:
        raise UnsupportedError("no MoE experts found: nothing to convert", path=str(model.ckpt.root))
    if name is None:
        for candidate in PREFERENCE[model.fmt.kind]:
            if not TARGETS[candidate].problems(model):
                return TARGETS[candidate]
        raise TargetError(f"no target can hold this {model.fmt.name} checkpoint: {TARGETS['canonical'].problems(model)[0]}")
    target = get_target(name)
    problems = target.problems(model)
    if problems:
        able = [t for t in PREFERENCE[model.fmt.kind] if t != name and not TARGETS[t].problems(model)]
        hint = f"; use --target {able[0]}" if able else ""
        raise TargetError(f"target {name} cannot hold this {model.fmt.name} checkpoint exactly: {problems[0]}{hint}")
    return target


def plan_conversion(model: ModelMap, target: Target, max_shard_size: int = DEFAULT_MAX_SHARD) -> ConversionPlan:
    layers = [layer_plan(model, layer) for layer in model.moe_layers]
    items: list[tuple[list, OutputTensor]] = []
    consumed = set(model.expert_tensors())
    for name in model.ckpt.names():
        if name in consumed:
            continue
        info = model.ckpt.info(name)
        spec = TensorSpec(name, torch_dtype(info.torch_dtype_name), tuple(info.shape))
        items.append((_order_key(name, 0), OutputTensor(spec, source=name)))
    for i, plan in enumerate(layers):
        for j, (spec, meta) in enumerate(target.plan_layer(plan)):
            meta = {**meta, "source_format": model.fmt.name}
            items.append((_order_key(spec.name, 1, j), OutputTensor(spec, meta=meta, layer=i)))
    items.sort(key=lambda kv: kv[0])
    shards = _split(([t for _, t in items]), max_shard_size)
    return ConversionPlan(model, target, layers, shards, converted_config(model, target))


def _order_key(name: str, group: int, pos: int = 0) -> list:
    """By layer (non-layer tensors last), copied tensors before the converted experts."""
    layer = layer_of(name)
    return [math.inf if layer is None else layer, group, pos, natural_key(name)]


def _split(tensors: list[OutputTensor], max_size: int) -> list[Shard]:
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.spec.nbytes > max_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.spec.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def converted_config(model: ModelMap, target: Target) -> dict:
    config = json.loads(json.dumps(model.ckpt.config))
    source_qc = model.ckpt.quantization_config
    params = model.fmt.params
    first = model.moe_layers[0].experts[0]
    config["quantization_config"] = {
        "quant_method": "moeprep",
        "format_version": FORMAT_VERSION,
        "target": target.name,
        "shuffle_kind": target.name,
        "source_format": model.fmt.name,
        "bits": params.bits,
        "group_size": params.group_size,
        "symmetric": params.symmetric,
        "desc_act": params.desc_act,
        "num_experts": model.num_experts,
        "moe_layers": [layer.index for layer in model.moe_layers],
        "expert_names": {role: ref.module.rsplit(".", 1)[1] for role, ref in first.items()},
        "source_quantization_config": source_qc,
    }
    return config


def shard_metadata(plan: ConversionPlan, shard: Shard, extra: dict[int, dict[str, str]]) -> dict[str, str]:
    meta = {
        "format": "pt",
        "moeprep": metadata_json({"format_version": FORMAT_VERSION, "target": plan.target.name, "source_format": plan.model.fmt.name}),
    }
    for t in shard.tensors:
        if t.meta is not None:
            m = dict(t.meta)
            if t.spec.name.endswith(".w13_weight"):
                m.update(extra.get(t.layer, {}))
            meta[t.spec.name] = metadata_json(m)
    return meta


def describe_plan(plan: ConversionPlan) -> str:
    lines = [
        f"source   {plan.model.ckpt.root}  ({plan.model.fmt.name}, {plan.model.arch.name})",
        f"target   {plan.target.name}  ({plan.target.summary})",
        f"layers   {len(plan.layers)} MoE layers x {plan.model.num_experts} experts",
        f"output   {len(plan.shards)} shard(s), {plan.total_bytes / 1e6:.1f} MB of tensors",
    ]
    for shard in plan.shards:
        size = sum(t.spec.nbytes for t in shard.tensors)
        lines.append(f"{shard.file}  {len(shard.tensors)} tensors, {size / 1e6:.1f} MB")
        for t in shard.tensors:
            how = "convert" if t.meta else "copy"
            dtype = str(t.spec.dtype).removeprefix("torch.")
            lines.append(f"  {how:<7} {t.spec.name}  {dtype} {list(t.spec.shape)}")
    return "\n".join(lines)


# --- execution -----------------------------------------------------------------------------------


def check_paths(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise OutputError(f"the output is inside the source checkpoint {src}", path=str(out))
    if out_r in src_r.parents:
        raise OutputError(f"the output would contain the source checkpoint {src}", path=str(out))
    if out.exists() and not overwrite:
        raise OutputError("already exists (use --overwrite to replace it)", path=str(out))
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", path=str(out))


def _remove_stale_temps(out: Path) -> None:
    """Temp dirs left by runs that were killed (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``out``, moved onto it only when the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() and overwrite:
            old = out.parent / f".{out.name}.moeprep-old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the temporary output is removed."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _copy_range(src: Path, begin: int, nbytes: int, dst) -> None:
    dst.flush()
    with open(src, "rb") as f:
        offset, left = begin, nbytes
        while left:
            try:
                n = os.copy_file_range(f.fileno(), dst.fileno(), left, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = 0
            if n == 0:  # unsupported here, or the source ended early: fall back to plain reads
                f.seek(offset)
                chunk = f.read(min(left, 64 << 20))
                if not chunk:
                    raise OSError(errno.EIO, f"{src} ended early")
                dst.write(chunk)
                dst.flush()
                n = len(chunk)
            offset += n
            left -= n


class _Writer(SafetensorsWriter):
    def copy(self, name: str, src: Path, begin: int, nbytes: int) -> None:
        spec = self.specs[self._next]
        if spec.name != name or spec.nbytes != nbytes:
            raise RuntimeError(f"{self.path}: planned {spec.name}, got {name}")
        _copy_range(src, begin, nbytes, self._f)
        self._next += 1


def execute(
    plan: ConversionPlan,
    out: Path,
    overwrite: bool = False,
    workers: int = 1,
    progress: Optional[Callable[[int, bool], None]] = None,
) -> None:
    """Write the planned checkpoint into ``out`` atomically. ``progress(bytes, layer_done)``."""
    model, target = plan.model, plan.target
    try:
        with sigterm_as_interrupt(), atomic_dir(out, overwrite) as tmp, ThreadPoolExecutor(max(1, workers)) as pool:
            pending: dict[int, object] = {}
            next_layer = 0

            def layer_result(i: int):
                nonlocal next_layer
                while next_layer < len(plan.layers) and next_layer < i + max(1, workers):
                    pending[next_layer] = pool.submit(target.convert_layer, model, plan.layers[next_layer])
                    next_layer += 1
                return pending[i].result()

            converted: dict[int, dict] = {}
            weight_map: dict[str, str] = {}
            for shard in plan.shards:
                layers_here = sorted({t.layer for t in shard.tensors if t.layer is not None})
                extra = {i: target.extra_metadata(model, plan.layers[i]) for i in layers_here}
                writer = _Writer(tmp / shard.file, [t.spec for t in shard.tensors], shard_metadata(plan, shard, extra))
                try:
                    for t in shard.tensors:
                        if t.source is not None:
                            info = model.ckpt.info(t.source)
                            writer.copy(t.spec.name, model.ckpt.file_of(t.source), info.begin, info.nbytes)
                        else:
                            if t.layer not in converted:
                                converted[t.layer] = layer_result(t.layer)
                            tensors = converted[t.layer]
                            writer.write(t.spec.name, tensors.pop(t.spec.name))
                            if not tensors:  # the layer is fully written: free it
                                del converted[t.layer], pending[t.layer], tensors
                                model.ckpt.release()
                                if progress:
                                    progress(0, True)
                        weight_map[t.spec.name] = shard.file
                        if progress:
                            progress(t.spec.nbytes, False)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
            _write_small_files(plan, tmp, weight_map)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError("no space left on device; nothing was written", path=str(out)) from None
        raise OutputError(f"cannot write: {e.strerror or e}", path=str(out)) from None


def _write_small_files(plan: ConversionPlan, tmp: Path, weight_map: dict[str, str]) -> None:
    for f in plan.model.ckpt.iter_files():
        if f.name in _SKIP_FILES or f.name.endswith(_SKIP_SUFFIXES) or f.name == "config.json":
            continue
        shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    index = {"metadata": {"total_size": plan.total_bytes, "format": "moeprep", "target": plan.target.name}, "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert(
    src: str,
    out: str | os.PathLike,
    target: Optional[str] = None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    overwrite: bool = False,
    workers: int = 1,
    progress: Optional[Callable[[int, bool], None]] = None,
) -> ConversionPlan:
    """Convert ``src`` (directory or hub repo id) into ``out``. Returns the executed plan."""
    model = build_model_map(Checkpoint(src))
    chosen = choose_target(model, target)
    out = Path(out)
    check_paths(model.ckpt.root, out, overwrite)
    plan = plan_conversion(model, chosen, max_shard_size)
    execute(plan, out, overwrite, workers, progress)
    return plan
