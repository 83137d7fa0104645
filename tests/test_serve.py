"""Serving converted checkpoints. Every target and architecture against a dense fp32
reference built independently from the quantizer's reference weights (ref_dequant) and the
router; the transformers path against transformers' own model with the same weights."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REAL_FIXTURES, run_cli, source_dir
from hostile import edit_tensor_meta
from test_commands_convert import accepting_targets

SERVE_SOURCES = sorted(REAL_FIXTURES) + ["ct_int4_sym_mixtral_llmc", "gptoss_mxfp4", "gptq_v1_asym_descact_mixtral_sharded", "gptq_v2_sym_descact_bf16"]


def read_plain(src: Path, name: str) -> torch.Tensor:
    index = src / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(src / shard, "pt") as f:
        return f.get_tensor(name)


def dense_moe(src: Path, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The architecture's MoE block written out directly on ref_dequant's fp32 weights."""
    config = json.loads((src / "config.json").read_text())
    ref = load_file(src / "ref_dequant.safetensors")
    model_type = config["model_type"]
    k = config["num_experts_per_tok"]
    prefix = next(n for n in ref if f"layers.{layer}." in n and ".experts." in n).split(".experts.")[0]
    names = ("w1", "w3", "w2") if f"{prefix}.experts.0.w1.weight" in ref else ("gate_proj", "up_proj", "down_proj")
    router = "router" if model_type == "gpt_oss" else "gate"
    w_r = read_plain(src, f"{prefix}.{router}.weight").float()
    logits = x @ w_r.t()
    if model_type == "gpt_oss":
        logits = logits + read_plain(src, f"{prefix}.{router}.bias").float()
        top, ids = torch.topk(logits, k)
        weights = torch.softmax(top, dim=-1)
    else:
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, k)
        if model_type == "mixtral" or config.get("norm_topk_prob"):
            weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(ids[t, j])
            g, u, d = (ref[f"{prefix}.experts.{e}.{n}.weight"] for n in names)
            if model_type == "gpt_oss":
                gu_b = read_plain(src, f"{prefix}.experts.gate_up_proj_bias")[e].float()
                d_b = read_plain(src, f"{prefix}.experts.down_proj_bias")[e].float()
                gate = (g @ x[t] + gu_b[0::2]).clamp(max=config.get("swiglu_limit", 7.0))
                up = (u @ x[t] + gu_b[1::2]).clamp(-config.get("swiglu_limit", 7.0), config.get("swiglu_limit", 7.0))
                h = (up + 1) * gate * torch.sigmoid(1.702 * gate)
                y = d @ h + d_b
            else:
                y = d @ (F.silu(g @ x[t]) * (u @ x[t]))
            out[t] += weights[t, j] * y
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def converted(fixtures_dir, packed, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    done = {}

    def get(source: str, target: str) -> tuple[Path, Path]:
        key = (source, target)
        if key not in done:
            src = source_dir(fixtures_dir, packed, source)
            out = root / f"{source}-{target}"
            assert run_cli("convert", str(src), str(out), "--target", target).returncode == 0
            done[key] = (src, out)
        return done[key]

    return get


@pytest.mark.parametrize("source", SERVE_SOURCES)
def test_moe_layer_matches_dense_reference_every_target(converted, fixtures_dir, packed, source):
    import moeprep

    src = source_dir(fixtures_dir, packed, source)
    torch.manual_seed(0)
    hidden = json.loads((src / "config.json").read_text())["hidden_size"]
    x = torch.randn(19, hidden)
    want = dense_moe(src, 1, x)
    for target in accepting_targets(src):
        _, out = converted(source, target)
        block = moeprep.load_moe_layer(str(out), 1)
        assert block.backend == "reference"
        got = block(x)
        assert got.shape == x.shape
        assert rel_err(got, want) <= 1e-5, (target, rel_err(got, want))


def test_loaded_experts_carry_tags_through_to_and_parameter(converted):
    import moeprep

    _, out = converted("quark_mxfp4_qwen3moe", "mxfp4_moe")
    ckpt = moeprep.load(str(out))
    w = ckpt["model.layers.0.mlp.experts.w13_weight"]
    assert w.is_shuffled is True and w.shuffle_kind == "mxfp4_moe"
    moved = w.to("cpu", copy=True)
    assert moved.is_shuffled and moved.shuffle_kind == "mxfp4_moe"
    p = nn.Parameter(w, requires_grad=False)
    assert isinstance(p, nn.Parameter) and p.is_shuffled and p.shuffle_kind == "mxfp4_moe"
    block = moeprep.load_moe_layer(str(out), 0)
    block = block.to(torch.device("cpu"))
    assert block.w13_weight.shuffle_kind == "mxfp4_moe" and block.w2_weight_scale.is_shuffled
    assert not hasattr(ckpt["model.layers.0.mlp.gate.weight"], "is_shuffled")
    assert not hasattr(w + 0, "shuffle_kind")  # computed values are no longer "shuffled"


def test_unconverted_checkpoint_is_refused(fixtures_dir):
    import moeprep
    from moeprep.errors import MoeprepError

    with pytest.raises(MoeprepError, match="not a converted checkpoint"):
        moeprep.load(str(fixtures_dir / "awq_gemm_g32_qwen3moe"))


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"shuffle_kind": "not_a_kind"}, "shuffle_kind"),
        ({"shape": [8, 128, 128]}, "metadata implies"),
        ({"layout": {"op": "shuffle_weight", "layout": [32, 16]}}, "metadata layout"),
        ({"format_version": 99}, "format_version"),
    ],
)
def test_mismatched_metadata_is_refused(converted, tmp_path, changes, fragment):
    import moeprep
    from moeprep.errors import MoeprepError

    _, out = converted("quark_mxfp4_qwen3moe", "mxfp4_moe")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    edit_tensor_meta(bad, "model.layers.1.mlp.experts.w13_weight", **changes)
    with pytest.raises(MoeprepError, match=fragment) as e:
        moeprep.load(str(bad))
    assert "model.layers.1.mlp.experts.w13_weight" in str(e.value)
    assert run_cli("inspect", str(bad)).returncode == 2


def test_unknown_target_in_config_is_refused(converted, tmp_path):
    import moeprep
    from moeprep.errors import MoeprepError

    _, out = converted("quark_mxfp4_qwen3moe", "mxfp4_moe")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["target"] = cfg["quantization_config"]["shuffle_kind"] = "mystery"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeprepError, match="mystery"):
        moeprep.load(str(bad))


def _copy_with(out: Path, dest: Path, config=None, router_shape=None) -> Path:
    from hostile import _edit_header

    shutil.copytree(out, dest)
    if config:
        cfg = json.loads((dest / "config.json").read_text())
        cfg.update(config)
        (dest / "config.json").write_text(json.dumps(cfg))
    if router_shape:
        shard = next(p.name for p in dest.glob("*.safetensors")
                     if "model.layers.1.mlp.gate.weight" in safe_open(str(p), "pt").keys())
        _edit_header(shard, lambda h: h["model.layers.1.mlp.gate.weight"].update(shape=router_shape))(dest)
    return dest


def test_load_moe_layer_refuses_what_it_cannot_compute(converted, tmp_path):
    import moeprep
    from moeprep.errors import BadInputError

    _, out = converted("awq_gemm_g32_qwen3moe", "w4a16_preshuffle_zp")
    with pytest.raises(BadInputError, match="layer index is an int"):
        moeprep.load_moe_layer(str(out), True)
    too_many = _copy_with(out, tmp_path / "topk", config={"num_experts_per_tok": 9})
    with pytest.raises(BadInputError, match="routes each token to 9 experts, the layer has 8") as e:
        moeprep.load_moe_layer(str(too_many), 1)
    assert "config.json" in str(e.value)
    experts, hidden = 8, 256
    for shape in ([experts // 2, hidden * 2], [experts * 2, hidden // 2]):  # the same bytes, other rows
        bad = _copy_with(out, tmp_path / f"router{shape[0]}", router_shape=shape)
        with pytest.raises(BadInputError, match=re.escape(f"router is {shape}")) as e:
            moeprep.load_moe_layer(str(bad), 1)
        assert "model.layers.1.mlp.gate.weight" in str(e.value)
