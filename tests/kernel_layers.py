"""Random MoE layers in every stored layout, for the kernels' tests and benchmark.

A layer is drawn in the source's canonical form (per expert gate/up/down ``QuantLinear``s, with
GPTQ-style ``g_idx`` for desc_act) and then written into the target's stored tensors the way a
conversion writes them: codes through ``moeprep.ops.repack_into``, scales and zero points
through the target's ``encode_*``. The canonical form is what the reference computes with.
"""
from __future__ import annotations

from typing import Optional

import torch

from moeprep import ops
from moeprep.canonical import QuantLinear
from moeprep.moe import ExpertWeights
from moeprep.targets import LayerPlan, ProjShape, get_target

PREFIX = "model.layers.0.mlp"


def _linear(kind: str, n: int, k: int, group_size: int, zero_points: bool, bias: bool, g_idx: Optional[torch.Tensor],
            scale_dtype: torch.dtype, gen: torch.Generator) -> QuantLinear:
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    groups = k // group_size
    if kind == "mxfp4":
        scales = torch.randint(119, 124, (n, groups), dtype=torch.uint8, generator=gen)
    else:
        scales = ((torch.rand((n, groups), generator=gen) + 0.5) * 2.0**-6).to(scale_dtype)
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=gen) if zero_points else None
    b = (torch.randn((n,), generator=gen) * 0.5).to(torch.bfloat16) if bias else None
    return QuantLinear(kind, codes, scales, group_size, zeros=zeros, g_idx=g_idx, bias=b)


def _act_order(k: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """A GPTQ act-order ``g_idx``: every group has group_size channels, scattered over K."""
    return (torch.randperm(k, generator=gen) // group_size).to(torch.int32)


def random_layer(
    target_name: str,
    num_experts: int,
    hidden: int,
    inter: int,
    *,
    group_size: int = 32,
    bias: bool = False,
    desc_act: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
    seed: Optional[int] = None,
) -> tuple[ExpertWeights, list[dict[str, QuantLinear]]]:
    """(stored layer on the CPU, its experts in canonical source form)."""
    target = get_target(target_name)
    kind = target.kinds[0]
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())
    zero_points = target.kernel_codes == "int4_unsigned"
    shapes = {
        "w13": ProjShape(num_experts, 2 * inter, hidden, hidden // group_size),
        "w2": ProjShape(num_experts, hidden, inter, inter // group_size),
    }
    source = []
    for _ in range(num_experts):
        g13 = _act_order(hidden, group_size, gen) if desc_act else None
        g2 = _act_order(inter, group_size, gen) if desc_act else None
        source.append({
            role: _linear(kind, n, k, group_size, zero_points, bias, g, scale_dtype, gen)
            for role, n, k, g in (("gate", inter, hidden, g13), ("up", inter, hidden, g13), ("down", hidden, inter, g2))
        })
    tensors, row_perm = _store(target_name, source, shapes, zero_points, bias, desc_act)
    plan = LayerPlan(0, PREFIX, shapes, {}, kind, desc_act)
    return ExpertWeights(PREFIX, plan, target, tensors, row_perm), source


def _store(target_name, source, shapes, zero_points, bias, desc_act):
    """The stored tensors of a layer, as ``Target.encode_layer`` lays them out."""
    target = get_target(target_name)
    layouts = (target.weight_layout["w13"][0], target.weight_layout["w2"][0])
    E = len(source)
    inter = shapes["w13"].rows // 2
    weights = {proj: torch.empty((E, s.rows, s.cols // 2), dtype=torch.uint8) for proj, s in shapes.items()}
    parts = {proj: {"scale": [], "zero": [], "bias": []} for proj in shapes}
    perms13, perms2 = [], []
    for e, ex in enumerate(source):
        # desc_act: sort each projection's inputs by group; w2's order is absorbed into w13's rows
        p13 = torch.sort(ex["gate"].g_idx.to(torch.int64), stable=True).indices if desc_act else None
        p2 = torch.sort(ex["down"].g_idx.to(torch.int64), stable=True).indices if desc_act else None
        for role, offset in (("gate", 0), ("up", inter)):
            ops.repack_into(weights["w13"], ex[role].codes, src_packing="canonical", layout=layouts[0], expert=e,
                            row_offset=offset, gate_up=target.gate_up_interleaved, row_index=p2, col_index=p13)
        ops.repack_into(weights["w2"], ex["down"].codes, src_packing="canonical", layout=layouts[1], expert=e,
                        col_index=p2)
        for proj, members, rows in (("w13", ("gate", "up"), p2), ("w2", ("down",), None)):
            def pick(t):
                return t if rows is None else t[rows]

            lin = [ex[m] for m in members]
            parts[proj]["scale"].append(torch.cat([pick(l.scales) for l in lin]))
            if zero_points:
                parts[proj]["zero"].append(torch.cat([pick(l.zeros) for l in lin]))
            if bias:
                parts[proj]["bias"].append(torch.cat([pick(l.bias) for l in lin]))
        perms13.append(p13)
        perms2.append(p2)
    tensors = {}
    for proj, s in shapes.items():
        tensors[f"{proj}_weight"] = weights[proj]
        tensors[f"{proj}_weight_scale"] = target.encode_scales(proj, torch.stack(parts[proj]["scale"]), s)
        if zero_points:
            tensors[f"{proj}_weight_zero_point"] = target.encode_zeros(proj, torch.stack(parts[proj]["zero"]), s)
        if bias:
            tensors[f"{proj}_bias"] = torch.stack(parts[proj]["bias"])
    row_perm = None
    if desc_act:
        tensors["w13_input_perm"] = torch.stack(perms13).to(torch.int32)
        row_perm = torch.stack(perms2).to(torch.int32)
    return tensors, row_perm


def layer_to(experts: ExpertWeights, device) -> ExpertWeights:
    return experts.to(device)


def linears_to(source: list[dict[str, QuantLinear]], device) -> list[dict[str, QuantLinear]]:
    def move(t):
        return None if t is None else t.to(device)

    return [
        {role: ql.with_(codes=move(ql.codes), scales=move(ql.scales), zeros=move(ql.zeros), g_idx=move(ql.g_idx),
                        bias=move(ql.bias)) for role, ql in ex.items()}
        for ex in source
    ]
