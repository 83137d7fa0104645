"""``moeprep verify SRC OUT``: prove a conversion exact, tensor by tensor, streaming both.

* every MoE layer of OUT, unshuffled through its target's inverse, equals SRC's canonical form
  (codes, scales, zero points, g_idx, biases), read by the source format's own reader;
* re-encoding those canonical tensors reproduces OUT's stored scale tensors byte for byte,
  pad bytes included;
* every other SRC tensor is in OUT, byte-identical;
* OUT's index lists every tensor once, no shard is missing or extra, sizes add up, and every
  converted tensor's metadata agrees with its header (checked when OUT is opened).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .canonical import QuantLinear, explicit_zeros
from .convert import copied_files
from .errors import MoeprepError, UnsupportedError
from .converted import Converted
from .io.checkpoint import INDEX_NAME, Checkpoint
from .io.hub import HubOptions
from .model import ModelMap, build_model_map

_CHUNK = 16 << 20
MAX_REPORTED = 10


@dataclass
class Report:
    checked: int = 0  # tensors
    files: int = 0  # copied files found byte-identical
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, msg: str) -> None:
        self.failures.append(msg)


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
    av, bv = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    diff = (av.view(torch.uint8) != bv.view(torch.uint8)).nonzero()
    if not diff.numel():
        return "identical"
    first = int(diff[0]) // a.element_size()
    at = [int(i) for i in np.unravel_index(first, tuple(a.shape))]
    return f"{diff.shape[0]} byte(s) differ, first at {at}: {av[first].item()} in SRC vs {bv[first].item()} in OUT"


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def compare_linear(src: QuantLinear, out: QuantLinear, where: str, report: Report) -> None:
    for field_name in ("codes", "scales", "zeros", "g_idx", "bias"):
        a, b = getattr(src, field_name), getattr(out, field_name)
        if field_name == "zeros" and (a is None) != (b is None):
            # implicit symmetric zero points are the explicit value 8 (e.g. GPTQ sym <-> signed int4)
            a, b = explicit_zeros(a, src.scales), explicit_zeros(b, out.scales)
        if not _same(a, b):
            how = "present in one only" if (a is None) != (b is None) else _first_diff(a, b)
            report.fail(f"{where} {field_name} differ: {how}")
    if src.group_size != out.group_size:
        report.fail(f"{where} group size {src.group_size} vs {out.group_size}")


def _bytes_equal(a: Path, a_off: int, b: Path, b_off: int, n: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(a_off)
        fb.seek(b_off)
        while n:
            k = min(n, _CHUNK)
            if fa.read(k) != fb.read(k):
                return False
            n -= k
    return True


def check_index(out: Checkpoint, report: Report) -> None:
    index_path = out.root / INDEX_NAME
    if out.index is None:
        report.fail(f"{index_path}: missing")
        return
    on_disk = {p.name for p in out.root.glob("*.safetensors")}
    extra = on_disk - set(out.shard_files)
    if extra:
        report.fail(f"{index_path}: shard(s) not in the index: {sorted(extra)}")
    total = out.index.get("metadata", {}).get("total_size")
    actual = sum(info.nbytes for _, info in out.tensors.values())
    if total != actual:
        report.fail(f"{index_path}: total_size {total} but the tensors hold {actual} bytes")


def open_pair(src: str, out: str, hub: HubOptions = HubOptions()) -> tuple[ModelMap, ModelMap]:
    """The maps of a source checkpoint and its conversion, refused unless they are that."""
    source = build_model_map(Checkpoint(src, hub))
    converted = build_model_map(Checkpoint(out, hub))
    if isinstance(source.fmt, Converted) and not isinstance(converted.fmt, Converted):
        raise UnsupportedError(
            f"the arguments look swapped: SRC is a converted checkpoint and OUT is not; run `moeprep verify {out} {src}`",
            path=str(source.ckpt.root / "config.json"),
        )
    if not isinstance(converted.fmt, Converted):
        raise UnsupportedError("not a checkpoint written by moeprep convert", path=str(converted.ckpt.root / "config.json"))
    if isinstance(source.fmt, Converted):
        raise UnsupportedError("SRC is itself a converted checkpoint; give the original", path=str(source.ckpt.root / "config.json"))
    return source, converted


def verify(src: str, out: str, progress: Optional[Callable[[int, int], None]] = None) -> Report:
    """Every check of OUT against SRC. ``progress(bytes, tensors)`` of OUT as they are checked."""
    return check_pair(*open_pair(src, out), progress)


def check_pair(source: ModelMap, converted: ModelMap, progress: Optional[Callable[[int, int], None]] = None) -> Report:
    source.check_other_scales()
    report = Report()
    check_index(converted.ckpt, report)
    _check_config(source, converted, report)
    _check_experts(source, converted, report, progress)
    fused = _check_fused_shared(source, converted, report)
    _check_copied(source, converted, report, progress, fused)
    _check_files(source, converted, report)
    return report


def _check_files(source: ModelMap, converted: ModelMap, report: Report) -> None:
    """Every file a conversion copies is in OUT byte for byte, and OUT holds no other file."""
    copied = {f.name: f for f in copied_files(source.ckpt)}
    written = {"config.json", INDEX_NAME} | set(converted.ckpt.shard_files)
    for p in sorted(converted.ckpt.root.iterdir()):
        if p.name in written:
            continue
        if p.name not in copied:
            report.fail(f"{p.name}: in OUT but not a file that convert copies from SRC")
            continue
        mine = copied.pop(p.name)
        try:
            theirs = converted.ckpt.inside(p)
        except MoeprepError as e:
            report.fail(f"{p.name}: {e.message}")
            continue
        size = mine.stat().st_size
        if theirs.stat().st_size == size and _bytes_equal(theirs, 0, mine, 0, size):
            report.files += 1
        else:
            report.fail(f"{p.name}: differs from SRC")
    for name in copied:
        report.fail(f"{name}: in SRC but missing from OUT")


def _check_config(source: ModelMap, converted: ModelMap, report: Report) -> None:
    qc = converted.ckpt.quantization_config
    if qc.get("source_format") != source.fmt.name:
        report.fail(f"config.json: source_format {qc.get('source_format')!r}, SRC is {source.fmt.name!r}")
    if json.dumps(qc.get("source_quantization_config"), sort_keys=True) != json.dumps(source.ckpt.quantization_config, sort_keys=True):
        report.fail("config.json: source_quantization_config differs from SRC's quantization_config")
    rest_src = {k: v for k, v in source.ckpt.config.items() if k != "quantization_config"}
    rest_out = {k: v for k, v in converted.ckpt.config.items() if k != "quantization_config"}
    if rest_src != rest_out:
        keys = sorted(k for k in set(rest_src) | set(rest_out) if rest_src.get(k) != rest_out.get(k))
        report.fail(f"config.json: model settings differ: {keys[:5]}")


def _check_experts(source: ModelMap, converted: ModelMap, report: Report, progress) -> None:
    out_layers = {layer.prefix: layer for layer in converted.moe_layers}
    for layer in source.moe_layers:
        out_layer = out_layers.pop(layer.prefix, None)
        if out_layer is None:
            report.fail(f"{layer.prefix}: MoE layer missing from OUT")
            continue
        if out_layer.num_experts != layer.num_experts:
            report.fail(f"{layer.prefix}: {out_layer.num_experts} experts in OUT, {layer.num_experts} in SRC")
            continue
        out_experts = converted.fmt.read_layer(converted.ckpt, layer.prefix)
        stored = list(converted.fmt.layer(converted.ckpt, layer.prefix).tensors.values())
        layer_bytes = sum(converted.ckpt.info(name).nbytes for name in stored)
        # each projection of every expert read in one batch: small tensors decoded together, codes per expert
        raws = {role: source.read_raw_batch([expert[role] for expert in layer.experts]) for role in layer.experts[0]}
        for e, expert in enumerate(layer.experts):
            for role, ref in expert.items():
                compare_linear(raws[role][e].to_canonical(), out_experts[e][role], f"{ref.module}:", report)
                report.checked += 1
            if progress:  # the layer's bytes, an expert's share at a time
                progress(layer_bytes * (e + 1) // len(layer.experts) - layer_bytes * e // len(layer.experts), 0)
        _check_reencoding(converted, layer.prefix, out_experts, report)
        source.ckpt.release()
        converted.ckpt.release()
        if progress:
            progress(0, len(stored))
    for prefix in out_layers:
        report.fail(f"{prefix}: MoE layer in OUT but not in SRC")


def _check_reencoding(converted: ModelMap, prefix: str, experts: list[dict[str, QuantLinear]], report: Report) -> None:
    """Stored scale/zero tensors must be exactly the target's encoding, pads included."""
    fmt: Converted = converted.fmt
    layer = fmt.layer(converted.ckpt, prefix)
    plan, target = layer.plan, fmt.target
    for proj, roles in (("w13", ("gate", "up")), ("w2", ("down",))):
        shape = plan.shapes[proj]
        perm = layer.row_perm if proj == "w13" else None
        for kind, field_name in (("weight_scale", "scales"), ("weight_zero_point", "zeros")):
            name = layer.tensors.get(f"{proj}_{kind}")
            if name is None:
                continue
            stacked = []
            for e, ex in enumerate(experts):
                rows = None if perm is None else perm[e].to(torch.int64)
                parts = [ex[r].scales if field_name == "scales" else explicit_zeros(ex[r].zeros, ex[r].scales) for r in roles]
                stacked.append(torch.cat([p if rows is None else p[rows] for p in parts]))
            encode = target.encode_scales if kind == "weight_scale" else target.encode_zeros
            expected = encode(proj, torch.stack(stacked), shape)
            stored = converted.ckpt.get_tensor(name)
            if not _same(expected, stored):
                report.fail(f"{name}: stored bytes are not the {target.name} encoding: {_first_diff(expected, stored)}")


def _check_fused_shared(source: ModelMap, converted: ModelMap, report: Report) -> frozenset[str]:
    """Shared experts that OUT stacks after the routed ones (``convert --fuse-shared-experts``):
    each is SRC's linear exactly, read canonically on both sides. Returns SRC's tensors they hold."""
    src = {ref.module: ref for ref in source.other_linears}
    held: set[str] = set()
    for out_ref in converted.other_linears:
        if out_ref.expert is None:
            continue
        ref = src.get(out_ref.module)
        if ref is None:
            report.fail(f"{out_ref.module}: stacked with OUT's experts but not a quantized linear of SRC")
            continue
        compare_linear(source.read(ref), converted.read(out_ref), f"{out_ref.module}:", report)
        report.checked += 1
        held |= set(ref.parts.values())
    return frozenset(held)


def _check_copied(source: ModelMap, converted: ModelMap, report: Report, progress=None,
                  fused: frozenset[str] = frozenset()) -> None:
    expert_tensors = set(source.expert_tensors()) | fused
    out_expert_tensors = set(converted.expert_tensors())
    for name in source.ckpt.names():
        if name in expert_tensors:
            continue
        if name not in converted.ckpt:
            report.fail(f"{name}: missing from OUT")
            continue
        a, b = source.ckpt.info(name), converted.ckpt.info(name)
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            report.fail(f"{name}: {a.dtype} {list(a.shape)} in SRC but {b.dtype} {list(b.shape)} in OUT")
        elif not _bytes_equal(source.ckpt.file_of(name), a.begin, converted.ckpt.file_of(name), b.begin, a.nbytes):
            report.fail(f"{name}: bytes differ from SRC")
        report.checked += 1
        if progress:
            progress(b.nbytes, 1)
    for name in converted.ckpt.names():
        if name not in out_expert_tensors and name not in source.ckpt:
            report.fail(f"{name}: in OUT but not in SRC")
