"""build_checkpoint: a complete Hugging Face checkpoint directory of one format, with its
dequantized reference computed back from the written files by the independent oracle."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import qconfigs, st_io
from .archs import (PROJS, Naming, attention_modules, generation_config, is_linear_attention, model_config,
                    moe_layers)
from .floats import to_stored
from .formats import (interleave, pack_awq, pack_ct_int4, pack_ct_mxfp4, pack_gptoss_experts,
                      pack_gptq, pack_quark_mxfp4)
from .options import INT4_FORMATS, Options, resolve
from .reference import iter_reference, reference_metadata
from .rtn import act_order_g_idx, quantize_int4, quantize_mxfp4, sequential_g_idx
from .weights import base_model, is_linear_weight, random_model, vision_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Packed:
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # on-disk name -> stored array, in order
    quantized: list[str] = field(default_factory=list)
    zero_points_forced: int = 0


def model_dtype(fmt: str, o: Options) -> str:
    """compressed-tensors and AWQ store scales in the dtype the model was loaded in; GPTQModel
    writes fp16 scales next to a bf16 model."""
    return o.scale_dtype if fmt in ("ct_int4", "awq") else "bfloat16"


def _input_group(canonical_module: str) -> str:
    """Modules that read the same activations share desc_act's order (same Hessian):
    q/k/v of a layer, and gate/up of an expert."""
    return re.sub(r"\.(?:[qkv]_proj|(gate|up)_proj)$", lambda m: ".gate_up" if m[1] else ".qkv", canonical_module)


class _ModulePacker:
    def __init__(self, fmt: str, o: Options) -> None:
        self.fmt, self.o = fmt, o
        self.rng = np.random.default_rng([o.seed, 1])
        self.g_idx: dict[str, np.ndarray] = {}
        self.zero_points_forced = 0

    def _g_idx(self, canonical_module: str, in_features: int) -> np.ndarray:
        if not (self.fmt == "gptq" and self.o.desc_act):
            return sequential_g_idx(in_features, self.o.group_size)
        key = _input_group(canonical_module)
        if key not in self.g_idx:
            self.g_idx[key] = act_order_g_idx(in_features, self.o.group_size, self.rng)
        return self.g_idx[key]

    def pack(self, canonical_module: str, w: np.ndarray) -> dict[str, np.ndarray]:
        o = self.o
        if self.fmt in INT4_FORMATS:
            g_idx = self._g_idx(canonical_module, w.shape[1])
            force = None
            if o.zero_point_zero_frac:
                force = self.rng.random((w.shape[0], int(g_idx.max()) + 1)) < o.zero_point_zero_frac
                self.zero_points_forced += int(force.sum())
            divide_in = model_dtype(self.fmt, o) if self.fmt == "ct_int4" else None
            c = quantize_int4(w, g_idx, bool(o.sym), str(o.scale_dtype), force, divide_in)
            if self.fmt == "ct_int4":
                return pack_ct_int4(c)
            if self.fmt == "gptq":
                return pack_gptq(c, o.checkpoint_format)
            return pack_awq(c)
        c4 = quantize_mxfp4(w, o.mxfp4_signed_zero)
        return pack_ct_mxfp4(c4) if self.fmt == "ct_mxfp4" else pack_quark_mxfp4(c4)


def _pack_per_module(fmt: str, o: Options, floats: dict[str, np.ndarray], naming: Naming) -> Packed:
    """Qwen3-MoE / Mixtral: every linear is its own 2-D module (Surprise 1: quantizers split
    transformers' fused experts into per-expert Linears)."""
    packer = _ModulePacker(fmt, o)
    dtype = model_dtype(fmt, o)
    out = Packed()
    for name, w in floats.items():
        quantize = fmt != "bf16" and is_linear_weight(name) and (o.quantize_attention or ".self_attn." not in name)
        if name.endswith(".e_score_correction_bias"):  # float32 in every DeepSeek/GLM checkpoint
            out.tensors[naming.rename(name)] = w.astype(np.float32)
            continue
        if not quantize:
            out.tensors[naming.rename(name)] = to_stored(w, dtype)
            continue
        module = naming.rename(name)[: -len(".weight")]
        for suffix, arr in packer.pack(name[: -len(".weight")], w).items():
            out.tensors[f"{module}.{suffix}"] = arr
        out.quantized.append(module)
    out.zero_points_forced = packer.zero_points_forced
    return out


def _stack_experts(floats: dict[str, np.ndarray], layer: int, proj: str, kind: str, n: int) -> np.ndarray:
    return np.stack([floats[f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.{kind}"] for e in range(n)])


def _pack_gptoss(fmt: str, o: Options, floats: dict[str, np.ndarray], naming: Naming) -> Packed:
    """gpt-oss: experts fused per layer with gate/up rows interleaved; attention, router,
    sinks and biases stay bf16."""
    out = Packed()
    for name, w in floats.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\..*", name)
        if not m:
            out.tensors[naming.rename(name)] = to_stored(w, "bfloat16")
            continue
        if name != f"model.layers.{m[1]}.mlp.experts.0.gate_proj.weight":
            continue
        layer = int(m[1])
        experts = {(p, kind): _stack_experts(floats, layer, p, kind, o.num_experts)
                   for p in PROJS for kind in ("weight", "bias")}
        fused = {
            "gate_up_proj": interleave(experts["gate", "weight"], experts["up", "weight"], axis=-2),
            "down_proj": experts["down", "weight"],
        }
        biases = {
            "gate_up_proj": interleave(experts["gate", "bias"], experts["up", "bias"], axis=-1),
            "down_proj": experts["down", "bias"],
        }
        prefix = f"{naming.moe_prefix(layer)}.experts"
        for stem, weight in fused.items():
            if fmt == "gptoss_mxfp4":
                packed = pack_gptoss_experts(quantize_mxfp4(weight, o.mxfp4_signed_zero))
                out.tensors[f"{prefix}.{stem}_blocks"] = packed["blocks"]
                out.tensors[f"{prefix}.{stem}_scales"] = packed["scales"]
            else:  # transformers' in-memory (and saved) orientation is [E, in, out]
                out.tensors[f"{prefix}.{stem}"] = to_stored(np.swapaxes(weight, 1, 2), "bfloat16")
            out.tensors[f"{prefix}.{stem}_bias"] = to_stored(biases[stem], "bfloat16")
        if fmt == "gptoss_mxfp4":
            out.quantized += [naming.expert(layer, e, p) for e in range(o.num_experts) for p in PROJS]
    return out


def _ignored_modules(fmt: str, arch: str, o: Options, naming: Naming) -> list[str]:
    """Resolved names of what stays unquantized, in model order (Surprise 9)."""
    names: list[str] = []
    sparse = moe_layers(arch, o)
    for layer in range(o.num_layers):
        if not o.quantize_attention:
            names += [naming.module(m) for m in attention_modules(arch, layer)]
        if is_linear_attention(arch, layer):  # the delta-net's 4-row projections stay bf16
            names += [naming.module(f"model.layers.{layer}.linear_attn.in_proj_{x}") for x in ("b", "a")]
        # Quark only lists the Mixtral router when it is an nn.Linear, which it is not there.
        if layer in sparse and not (fmt == "quark_mxfp4" and arch == "mixtral"):
            names.append(naming.router(layer))
        if layer in sparse and arch == "qwen3_5_moe":
            names.append(naming.module(f"model.layers.{layer}.mlp.shared_expert_gate"))
    if o.multimodal:
        names += [n[: -len(".weight")] for n, shape in vision_shapes(o.hidden).items() if len(shape) == 2]
    return names + ["lm_head"]


def quantization_config(fmt: str, arch: str, o: Options, naming: Naming) -> dict[str, Any] | None:
    skip_attention = not o.quantize_attention
    if fmt == "ct_int4":
        return qconfigs.ct_int4(bool(o.sym), o.group_size, _ignored_modules(fmt, arch, o, naming))
    if fmt == "ct_mxfp4":
        return qconfigs.ct_mxfp4(_ignored_modules(fmt, arch, o, naming))
    if fmt == "gptq":
        return qconfigs.gptq(bool(o.sym), o.desc_act, o.checkpoint_format, o.group_size, skip_attention)
    if fmt == "awq":
        return qconfigs.awq(o.group_size, skip_attention)
    if fmt == "quark_mxfp4":
        return qconfigs.quark(_ignored_modules(fmt, arch, o, naming), o.quark_scheme)
    if fmt == "gptoss_mxfp4":
        return qconfigs.gptoss_mxfp4()
    return None


def shard_names(tensors: dict[str, np.ndarray], shards: int) -> list[list[str]]:
    """Contiguous runs of the (layer-ordered) tensors with balanced byte sizes, none empty."""
    names = list(tensors)
    if shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    cum = np.cumsum([tensors[n].nbytes for n in names])
    cuts = [0]
    for i in range(1, shards):
        cut = int(np.searchsorted(cum, cum[-1] * i / shards)) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), len(names) - (shards - i)))
    cuts.append(len(names))
    return [names[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def write_weights(out_dir: Path, tensors: dict[str, np.ndarray], shards: int) -> list[str]:
    if shards == 1:
        st_io.save(out_dir / "model.safetensors", tensors)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(shard_names(tensors, shards), start=1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        st_io.save(out_dir / fname, {n: tensors[n] for n in names})
        weight_map.update({n: fname for n in names})
        files.append(fname)
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index, sort_keys=False)
    return files + ["model.safetensors.index.json"]


def _write_json(path: Path, data: Any, sort_keys: bool) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def _moe_blocks(fmt: str, arch: str, o: Options, naming: Naming) -> list[dict[str, Any]]:
    blocks = []
    for layer in moe_layers(arch, o):
        block: dict[str, Any] = {
            "layer": layer,
            "prefix": naming.moe_prefix(layer),
            "router": naming.router(layer),
            "experts": [{p: naming.expert(layer, e, p) for p in PROJS} for e in range(o.num_experts)],
        }
        if arch == "gpt_oss":
            stem = f"{naming.moe_prefix(layer)}.experts"
            block["fused"] = {"gate_up": f"{stem}.gate_up_proj", "down": f"{stem}.down_proj",
                              "gate_up_interleaved": True}
        blocks.append(block)
    return blocks


def build_checkpoint(out_dir: str | Path, fmt: str, arch: str = "qwen3_moe", **options: Any) -> Path:
    """Write a checkpoint of `fmt` for `arch` into out_dir (created) and return its path.

    Files: config.json (+ quantization_config), generation_config.json, quantize_config.json
    (GPTQModel producers), model.safetensors or shards + index, ref_dequant.safetensors,
    packer_info.json, and the tokenizer files when tokenizer_dir is given. See options.Options."""
    o = resolve(fmt, arch, options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floats = random_model(arch, o) if o.base_weights is None else base_model(arch, o, o.base_weights)
    naming = Naming(arch, o.mixtral_naming or "original", o.multimodal)
    packed = (_pack_gptoss if arch == "gpt_oss" else _pack_per_module)(fmt, o, floats, naming)
    files = write_weights(out, packed.tensors, o.shards)

    dtype = "bfloat16" if arch == "gpt_oss" else model_dtype(fmt, o)
    config = model_config(arch, o, dtype)
    qc = quantization_config(fmt, arch, o, naming)
    if qc is not None:
        config["quantization_config"] = qc
    _write_json(out / "config.json", config, sort_keys=True)
    _write_json(out / "generation_config.json", generation_config(sampling=fmt in ("gptq", "awq")), sort_keys=False)
    files += ["config.json", "generation_config.json"]
    if fmt in ("gptq", "awq"):
        _write_json(out / "quantize_config.json", qc, sort_keys=False)
        files.append("quantize_config.json")
    if o.tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            shutil.copyfile(Path(o.tokenizer_dir) / fname, out / fname)
        files += list(TOKENIZER_FILES)

    reference = dict(iter_reference(out))
    st_io.save(out / "ref_dequant.safetensors", reference, reference_metadata())
    files.append("ref_dequant.safetensors")

    info = {
        "fmt": fmt,
        "arch": arch,
        "options": o.as_json(),
        "model_dtype": dtype,
        "quantized_modules": packed.quantized,
        "reference_modules": [k[: -len(".weight")] for k in reference],
        "attention_modules": [naming.module(m) for layer in range(o.num_layers) for m in attention_modules(arch, layer)],
        "routers": [naming.router(layer) for layer in moe_layers(arch, o)],
        "moe_blocks": _moe_blocks(fmt, arch, o, naming),
        "zero_points_forced_to_zero": packed.zero_points_forced,
        "files": sorted(files + ["packer_info.json"]),
    }
    _write_json(out / "packer_info.json", info, sort_keys=False)
    return out
