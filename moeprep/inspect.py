"""``moeprep inspect``: what a checkpoint holds, from its headers alone."""
from __future__ import annotations

from .arch import ROLES
from .model import ModelMap


def describe(model: ModelMap) -> dict:
    """A JSON-ready summary. Reads no tensor data."""
    cfg = model.arch.settings(model.ckpt.config)
    layers = model.moe_layers
    info = {
        **model.fmt.describe(),
        "kind": model.fmt.kind,
        "quant_method": (model.ckpt.quantization_config or {}).get("quant_method"),
        "architecture": model.arch.name,
        "routing": model.arch.routing,
        "shared_expert_layers": _shared_expert_layers(model),
        "model_type": model.ckpt.config.get("model_type"),  # config.json's own, multimodal or not
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


def _shared_expert_layers(model: ModelMap) -> list[int]:
    """The MoE layers that also hold the family's shared experts (by tensor name)."""
    name = model.arch.shared_experts
    if not name:
        return []
    names = model.ckpt.names()
    return [layer.index for layer in model.moe_layers if any(n.startswith(f"{layer.prefix}.{name}.") for n in names)]


def _expert_shapes(model: ModelMap) -> dict:
    if not model.moe_layers:
        return {}
    expert = model.moe_layers[0].experts[0]
    return {role: [expert[role].out_features, expert[role].in_features] for role in ROLES}


FIRST_NAMES = 5  # tensor names per kind that the text summary shows


def render_text(info: dict, all_tensors: bool = False) -> str:
    """The summary a person reads: counts per kind of tensor and the first few names of each
    (every name with ``all_tensors``)."""
    lines = [f"format          {info['format']}  (quant_method {info['quant_method']})", _quantization(info)]
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
    for key, title in (("experts", "expert tensors"), ("quantized_linears", "other quantized linears"),
                       ("plain", "plain tensors")):
        names = info["tensors"][key]
        lines.append(f"{title:<26}{len(names)}")
        shown = names if all_tensors else names[:FIRST_NAMES]
        lines += [f"  {name}" for name in shown]
        if len(names) > len(shown):
            lines.append(f"  ... and {len(names) - len(shown)} more (--tensors lists them all)")
    return "\n".join(lines)


def _quantization(info: dict) -> str:
    if info.get("kind") == "mxfp4":
        return "quantization    MXFP4: E2M1 codes, one E8M0 (power of two) scale per 32 inputs"
    return (f"quantization    {info['bits']}-bit int, group size {info['group_size']}, "
            f"{'symmetric' if info['symmetric'] else 'asymmetric (zero points)'}, "
            f"{'act-order (desc_act)' if info['desc_act'] else 'groups in input order'}")
