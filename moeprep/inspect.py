"""``moeprep inspect``: what a checkpoint holds, from its headers alone."""
from __future__ import annotations

from .arch import ROLES
from .model import ModelMap


def describe(model: ModelMap) -> dict:
    """A JSON-ready summary. Reads no tensor data."""
    cfg = model.ckpt.config
    layers = model.moe_layers
    info = {
        **model.fmt.describe(),
        "quant_method": (model.ckpt.quantization_config or {}).get("quant_method"),
        "architecture": model.arch.name,
        "model_type": cfg.get("model_type"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "moe_layers": len(layers),
        "moe_layer_indices": [layer.index for layer in layers],
        "num_experts": model.num_experts,
        "top_k": cfg.get("num_experts_per_tok"),
        "hidden_size": layers[0].hidden_size if layers else cfg.get("hidden_size"),
        "moe_intermediate_size": layers[0].intermediate_size if layers else None,
        "expert_shapes": _expert_shapes(model),
        "shards": len(model.ckpt.shard_files),
        "tensors": {
            "experts": model.expert_tensors(),
            "quantized_linears": model.other_linear_tensors(),
            "plain": model.plain,
        },
    }
    info.update(model.fmt.describe_extra(model))
    return info


def _expert_shapes(model: ModelMap) -> dict:
    if not model.moe_layers:
        return {}
    expert = model.moe_layers[0].experts[0]
    return {role: [expert[role].out_features, expert[role].in_features] for role in ROLES}


def render_text(info: dict) -> str:
    t = info["tensors"]
    lines = [
        f"format          {info['format']}  (quant_method {info['quant_method']})",
        f"quantization    {info['bits']}-bit, group size {info['group_size']}, "
        f"{'symmetric' if info['symmetric'] else 'asymmetric'}, desc_act {str(info['desc_act']).lower()}",
    ]
    if "target" in info:
        lines.append(f"target          {info['target']}  (shuffle_kind {info['shuffle_kind']}, source {info['source_format']})")
    lines += [
        f"architecture    {info['architecture']}  ({info['num_hidden_layers']} layers, hidden {info['hidden_size']})",
        f"MoE             {info['moe_layers']} layers x {info['num_experts']} experts, top-{info['top_k']}, "
        f"intermediate {info['moe_intermediate_size']}",
    ]
    for role, shape in info["expert_shapes"].items():
        lines.append(f"  expert {role:<5}  [out {shape[0]}, in {shape[1]}]")
    lines.append(f"shards          {info['shards']}")
    lines.append(f"expert tensors            {len(t['experts'])}")
    lines.append(f"other quantized linears   {len(t['quantized_linears'])} tensors")
    lines += [f"  {name}" for name in t["quantized_linears"]]
    lines.append(f"plain tensors             {len(t['plain'])}")
    lines += [f"  {name}" for name in t["plain"]]
    return "\n".join(lines)
