"""``moeprep convert``: a quantized checkpoint into a preshuffled one, streamed and atomic.

The whole output is planned from headers first (every tensor's name, dtype, shape, shard and
metadata), so each shard's header is written before its data and each tensor is written once,
as soon as it exists. MoE layers are converted one at a time (``workers`` of them ahead at
most); every other tensor is copied byte for byte straight from the source file.
"""
from __future__ import annotations

import errno
import json
import math
import os
import queue
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .lazy import torch

from .errors import BadInputError, MoeprepError, OutputError, TargetError, UnsupportedError
from .io import strict_json
from .io.checkpoint import INDEX_NAME, Checkpoint, check_outside
from .io.outputs import check_replaceable, published, sigterm_as_interrupt
from .io.safetensors_writer import SafetensorsWriter, TensorSpec
from .io.names import layer_of, natural_key
from .model import ModelMap, build_model_map
from .targets import FORMAT_VERSION, PREFERENCE, TARGETS, LayerPlan, SourceLayer, Target, get_target
from .targets.base import metadata_json

DEFAULT_MAX_SHARD = 5 * 1000**3
# Files that are other copies of the weights, never carried into the output.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")
_SKIP_FILES = {INDEX_NAME, "quantize_config.json"}


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


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?B|B)?")
_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2,
          "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``123`` -> bytes; anything else is a usage error (exit 2)."""
    m = _SIZE.fullmatch(text.strip().upper())
    value = int(float(m[1]) * _UNITS[m[2] or "B"]) if m else 0
    if value <= 0:
        raise MoeprepError(f"--max-shard-size {text!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    return value


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
            if not model.target_problems(TARGETS[candidate]):
                return TARGETS[candidate]
        raise TargetError(f"no target can hold this {model.fmt.name} checkpoint: {model.target_problems(TARGETS['canonical'])[0]}")
    target = get_target(name)
    problems = model.target_problems(target)
    if problems:
        able = [t for t in PREFERENCE[model.fmt.kind] if t != name and not model.target_problems(TARGETS[t])]
        hint = f"; use --target {able[0]}" if able else ""
        raise TargetError(f"target {name} cannot hold this {model.fmt.name} checkpoint exactly: {problems[0]}{hint}")
    return target


def plan_conversion(model: ModelMap, target: Target, max_shard_size: int = DEFAULT_MAX_SHARD) -> ConversionPlan:
    layers = model.plans()
    items: list[tuple[list, OutputTensor]] = []
    consumed = set(model.expert_tensors())
    for name in model.ckpt.names():
        if name in consumed:
            continue
        info = model.ckpt.info(name)
        spec = TensorSpec(name, info.torch_dtype_name, tuple(info.shape))
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
    if model.fused_shared:  # the stacked tensors hold num_experts routed experts, then this module
        config["quantization_config"]["fused_shared_experts"] = model.arch.shared_experts
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
            lines.append(f"  {how:<7} {t.spec.name}  {t.spec.dtype} {list(t.spec.shape)}")
    return "\n".join(lines)


# --- execution -----------------------------------------------------------------------------------


def check_paths(src: Path, out: Path, overwrite: bool, force: bool = False) -> None:
    """Refuse, before any work, an output that would touch the source or replace something that
    may not be replaced."""
    check_outside(src, out)
    if out.resolve() in src.resolve().parents:
        raise BadInputError(f"the output would contain the source checkpoint {src}", path=str(out))
    check_replaceable(out, overwrite, force, is_converted_output, "dir")


def is_converted_output(path: Path) -> bool:
    """Whether a directory holds what ``moeprep convert`` writes: its config and its index."""
    try:
        config = strict_json.loads((path / "config.json").read_bytes())
        index = strict_json.loads((path / INDEX_NAME).read_bytes())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    meta = index.get("metadata") if isinstance(index, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "moeprep" and isinstance(meta, dict) \
        and meta.get("format") == "moeprep"


class _LayerStream:
    """One layer's output pieces, produced by a background thread a bounded queue ahead of the
    writer, so reading and repacking overlap with writing. Pieces arrive in plan order.

    Weight blocks are recycled through a small pool: fresh pages cost more than the repack
    itself on small machines, and the pool bounds memory to ``depth + 2`` expert blocks.
    """

    _DONE = object()

    def __init__(self, target: Target, layer: LayerPlan, source: SourceLayer, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(depth)
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth + 2):
            self._free.put(torch.empty(0, dtype=torch.uint8))
        self._leased: dict[int, torch.Tensor] = {}
        self._stop = threading.Event()
        pieces = ((layer.tensor_name(role), piece) for role, piece in target.encode_layer(layer, source, self._alloc))
        self._thread = threading.Thread(target=self._run, args=(pieces,), daemon=True)
        self._held = None

    def start(self) -> "_LayerStream":
        self._thread.start()
        return self

    def _alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        need = math.prod(shape)
        while True:
            try:
                buf = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped from None
        if buf.numel() < need:
            buf = torch.empty(need, dtype=torch.uint8)
        self._leased[buf.data_ptr()] = buf
        return buf[:need].view(shape)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, pieces) -> None:
        try:
            for item in pieces:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except _Stopped:
            return
        except BaseException as e:  # handed to the writer thread, which raises it
            self._put(e)

    def _next(self):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def tensor(self, name: str) -> Iterator[torch.Tensor]:
        """The pieces of ``name``, the next tensor of the layer."""
        while True:
            item = self._next()
            if item is self._DONE or item[0] != name:
                self._held = item
                return
            piece = item[1]
            yield piece
            leased = self._leased.pop(piece.data_ptr(), None)
            if leased is not None:  # written: its block can be refilled
                self._free.put(leased)

    def close(self) -> None:
        """Stop the producer and wait for it, even through another Ctrl-C or SIGTERM: a thread
        left inside a C++ op when the interpreter exits aborts the process."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt:
                continue


class _Stopped(Exception):
    """The writer gave up on this layer (an error elsewhere): stop producing."""


def _reported(pieces: Iterator[torch.Tensor], progress: Optional[Callable[[int, int], None]]) -> Iterator[torch.Tensor]:
    for piece in pieces:
        yield piece
        if progress:
            progress(piece.numel() * piece.element_size(), 0)


def execute(
    plan: ConversionPlan,
    out: Path,
    workers: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Write the planned checkpoint into ``out`` atomically (replacing an old OUT in one step: see
    io/outputs.py; ``check_paths`` decides beforehand whether it may). ``progress(bytes, tensors)``
    as pieces and tensors are written.

    Up to ``workers`` MoE layers are produced in background threads ahead of the writer.
    """
    model, target = plan.model, plan.target
    model.check_other_scales()
    streams: dict[int, _LayerStream] = {}
    last_of_layer = {}
    for shard in plan.shards:
        for t in shard.tensors:
            if t.layer is not None:
                last_of_layer[t.layer] = t.spec.name

    def stream(i: int) -> _LayerStream:
        for j in range(i, min(i + max(1, workers), len(plan.layers))):
            if j not in streams:
                # registered before it starts, so an interrupt at any moment finds it to stop
                streams[j] = _LayerStream(target, plan.layers[j], model.source_layer(model.moe_layers[j]))
                streams[j].start()
        return streams[i]

    try:
        with sigterm_as_interrupt(), published(out, "dir") as tmp:
            weight_map: dict[str, str] = {}
            for shard in plan.shards:
                layers_here = sorted({t.layer for t in shard.tensors if t.layer is not None})
                extra = {i: target.extra_metadata(plan.layers[i], model.source_layer(model.moe_layers[i])) for i in layers_here}
                writer = SafetensorsWriter(tmp / shard.file, [t.spec for t in shard.tensors], shard_metadata(plan, shard, extra))
                try:
                    for t in shard.tensors:
                        if t.source is not None:
                            info = model.ckpt.info(t.source)
                            writer.copy(t.spec.name, model.ckpt.file_of(t.source), info.begin, info.nbytes)
                            if progress:
                                progress(t.spec.nbytes, 0)
                        else:
                            writer.write_pieces(t.spec.name, _reported(stream(t.layer).tensor(t.spec.name), progress))
                            if last_of_layer[t.layer] == t.spec.name:
                                streams.pop(t.layer).close()
                                model.ckpt.release()
                        weight_map[t.spec.name] = shard.file
                        if progress:
                            progress(0, 1)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
            _write_small_files(plan, tmp, weight_map)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError("no space left on device; nothing was written", path=str(out)) from None
        raise OutputError(f"cannot write: {e.strerror or e}", path=str(out)) from None
    finally:
        for s in streams.values():
            s.close()


def copied_files(ckpt: Checkpoint) -> list[Path]:
    """The files of a source that a conversion copies as they are (tokenizer, generation config,
    chat template, ...): all but the weights, the index and the configs it rewrites."""
    return [f for f in ckpt.iter_files()
            if f.name not in _SKIP_FILES and not f.name.endswith(_SKIP_SUFFIXES) and f.name != "config.json"]


def _write_small_files(plan: ConversionPlan, tmp: Path, weight_map: dict[str, str]) -> None:
    for f in copied_files(plan.model.ckpt):
        shutil.copyfile(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    index = {"metadata": {"total_size": plan.total_bytes, "format": "moeprep", "target": plan.target.name}, "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def convert(
    src: str,
    out: str | os.PathLike,
    target: Optional[str] = None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    overwrite: bool = False,
    force: bool = False,
    workers: int = 1,
    fuse_shared_experts: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ConversionPlan:
    """Convert ``src`` (directory or hub repo id) into ``out``; ``fuse_shared_experts`` appends
    each layer's shared expert to its stacked experts. Returns the executed plan."""
    model = build_model_map(Checkpoint(src))
    if fuse_shared_experts:
        model = model.fuse_shared_experts()
    chosen = choose_target(model, target)
    out = Path(out)
    check_paths(model.ckpt.root, out, overwrite, force)
    plan = plan_conversion(model, chosen, max_shard_size)
    execute(plan, out, workers, progress)
    return plan
