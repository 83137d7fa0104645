"""Self-tests of tests/packers, the independent packers and oracle that moeprep's tests trust.

(a) against the real fixtures: the oracle reproduces every ref_dequant bit for bit, the
    packers re-pack every fixture's codes into its exact bytes, builds have the fixtures'
    names/shapes/configs, and RTN re-quantizes the real bf16 base into the fixtures' bytes;
(b) round trips pack -> oracle unpack, code coverage, sharding, options;
(c) transformers loads the bf16 / gpt-oss MXFP4 builds with no missing or unexpected keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from packers import FORMATS, build_checkpoint, oracle
from packers.archs import Naming
from packers.floats import e2m1_codes, to_bf16_bits
from packers.formats import (interleave, pack_awq, pack_ct_int4, pack_ct_mxfp4,
                                   pack_gptoss_experts, pack_gptq, pack_quark_mxfp4)
from packers.options import resolve
from packers.reference import iter_reference
from packers.rtn import (Int4Codes, Mxfp4Codes, act_order_g_idx, quantize_int4,
                               quantize_mxfp4, sequential_g_idx)
from packers.st_io import Checkpoint, SafetensorsFile
from packers.weights import random_model

REAL_FIXTURES = {
    "ct_w4a16_g32_sym_qwen3moe": "ct_int4",
    "gptq_g32_descact0_qwen3moe": "gptq",
    "awq_gemm_g32_qwen3moe": "awq",
    "quark_mxfp4_qwen3moe": "quark_mxfp4",
}
BUILDS = [
    ("ct_int4", "qwen3_moe", {}),
    ("ct_int4", "mixtral", {"sym": False}),
    ("ct_mxfp4", "qwen3_moe", {}),
    ("gptq", "qwen3_moe", {"desc_act": True}),
    ("gptq", "mixtral", {"sym": False, "zero_point_zero_frac": 0.05}),
    ("gptq", "qwen3_moe", {"sym": False, "checkpoint_format": "gptq_v2", "desc_act": True}),
    ("awq", "qwen3_moe", {"scale_dtype": "bfloat16"}),
    ("awq", "mixtral", {}),
    ("quark_mxfp4", "mixtral", {}),
    ("gptoss_mxfp4", "gpt_oss", {}),
    ("bf16", "qwen3_moe", {}),
    ("bf16", "gpt_oss", {}),
]
SMALL = {"hidden": 128, "intermediate": 64, "num_experts": 4, "vocab": 64, "heads": 2, "kv_heads": 1}


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _ref(ckpt_dir: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(ckpt_dir / "ref_dequant.safetensors")
    return {k: f.get(k) for k in f.keys()}


def _build(tmp_path: Path, fmt: str, arch: str, **kw) -> Path:
    return build_checkpoint(tmp_path / f"{fmt}-{arch}", fmt, arch, **kw)


def _scale_dtype(stored: np.ndarray) -> str:
    return "bfloat16" if stored.dtype == np.uint16 else "float16"


# (a) real fixtures

@pytest.mark.parametrize("name", sorted(REAL_FIXTURES))
def test_oracle_reproduces_fixture_reference(fixtures_dir, name):
    expected = _ref(fixtures_dir / name)
    got = dict(iter_reference(fixtures_dir / name))
    assert sorted(got) == sorted(expected) and len(got) == 56
    for key, ref in expected.items():
        assert _bitwise_equal(got[key], ref), key


def _repack(fmt: str, ckpt: Checkpoint, module: str) -> dict[str, np.ndarray]:
    def get(suffix: str) -> np.ndarray:
        return ckpt.get(f"{module}.{suffix}")

    if fmt == "ct_int4":
        q, _ = oracle.unpack_ct_int4(get("weight_packed"), get("weight_shape"))
        s = get("weight_scale")
        g_idx = sequential_g_idx(q.shape[1], q.shape[1] // s.shape[1])
        return pack_ct_int4(Int4Codes(q, np.full(s.shape, 8, np.uint8), oracle.widen(s), g_idx, True, _scale_dtype(s)))
    if fmt == "gptq":
        q, z = oracle.unpack_gptq(get("qweight"), get("qzeros"), "gptq")
        s = get("scales")
        return pack_gptq(Int4Codes(q, z.T, oracle.widen(s).T, get("g_idx"), True, _scale_dtype(s)), "gptq")
    if fmt == "awq":
        q, z = oracle.unpack_awq(get("qweight"), get("qzeros"))
        s = get("scales")
        g_idx = sequential_g_idx(q.shape[0], q.shape[0] // s.shape[0])
        return pack_awq(Int4Codes(q.T, z.T, oracle.widen(s).T, g_idx, False, _scale_dtype(s)))
    return pack_quark_mxfp4(Mxfp4Codes(oracle.nibbles_of_bytes(get("weight")), get("weight_scale")))


@pytest.mark.parametrize("name", sorted(REAL_FIXTURES))
def test_packers_repack_fixture_codes_exactly(fixtures_dir, name):
    fmt = REAL_FIXTURES[name]
    ckpt = Checkpoint(fixtures_dir / name)
    modules = [k[: -len(".weight")] for k in _ref(fixtures_dir / name)]
    for module in modules:
        for suffix, arr in _repack(fmt, ckpt, module).items():
            assert _bitwise_equal(arr, ckpt.get(f"{module}.{suffix}")), f"{module}.{suffix}"
    assert len(modules) == 56


@pytest.mark.parametrize("name", sorted(REAL_FIXTURES) + ["base_qwen3moe_bf16"])
def test_build_matches_fixture_layout_and_configs(tmp_path, fixtures_dir, name):
    fmt = REAL_FIXTURES.get(name, "bf16")
    built = build_checkpoint(tmp_path / name, fmt, tokenizer_dir=fixtures_dir / "base_qwen3moe_bf16")
    ours, theirs = Checkpoint(built), Checkpoint(fixtures_dir / name)
    assert {k: (ours.dtype(k), ours.get(k).shape) for k in ours.keys()} == \
        {k: (theirs.dtype(k), theirs.get(k).shape) for k in theirs.keys()}
    for fname in ("config.json", "generation_config.json", "quantize_config.json"):
        if not (fixtures_dir / name / fname).exists():
            assert not (built / fname).exists()
            continue
        a, b = (json.loads((d / fname).read_text()) for d in (built, fixtures_dir / name))
        a.pop("transformers_version", None), b.pop("transformers_version", None)
        assert a == b, fname
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        assert (built / fname).read_bytes() == (fixtures_dir / "base_qwen3moe_bf16" / fname).read_bytes()


@pytest.mark.parametrize("name,kw", [("ct_w4a16_g32_sym_qwen3moe", {}),
                                     ("quark_mxfp4_qwen3moe", {"mxfp4_signed_zero": False})])
def test_rtn_requantizes_real_base_into_fixture_bytes(tmp_path, fixtures_dir, name, kw):
    """llm-compressor's and Quark's data-free RTN are reproduced exactly from the bf16 base."""
    built = build_checkpoint(tmp_path / name, REAL_FIXTURES[name],
                             base_weights=fixtures_dir / "base_qwen3moe_bf16", **kw)
    ours, theirs = Checkpoint(built), Checkpoint(fixtures_dir / name)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for key in theirs.keys():
        assert _bitwise_equal(ours.get(key), theirs.get(key)), key
    ref_ours, ref_theirs = _ref(built), _ref(fixtures_dir / name)
    assert all(_bitwise_equal(ref_ours[k], ref_theirs[k]) for k in ref_theirs)


# (b) round trips and coverage

def _weights(rng: np.random.Generator, out_f: int = 64, in_f: int = 256) -> np.ndarray:
    rows = np.exp(0.5 * rng.standard_normal((out_f, 1)))
    offsets = np.repeat(0.01 * rng.standard_normal((out_f, in_f // 32)), 32, axis=1)
    return ((0.02 * rng.standard_normal((out_f, in_f)) + offsets) * rows).astype(np.float32)


INT4_CASES = [
    ("ct_int4", True, False, "bfloat16"),
    ("ct_int4", False, False, "float16"),
    ("gptq", True, False, "float16"),
    ("gptq", False, True, "float16"),
    ("gptq_v2", False, True, "bfloat16"),
    ("awq", False, False, "float16"),
    ("awq", False, False, "bfloat16"),
]


@pytest.mark.parametrize("fmt,sym,desc_act,scale_dtype", INT4_CASES)
def test_int4_pack_unpack_round_trip(fmt, sym, desc_act, scale_dtype):
    rng = np.random.default_rng(7)
    w = _weights(rng)
    g_idx = act_order_g_idx(256, 32, rng) if desc_act else sequential_g_idx(256, 32)
    force = None if sym else rng.random((64, 8)) < 0.1
    c = quantize_int4(w, g_idx, sym, scale_dtype, force)
    assert set(np.unique(c.codes)) == set(range(16))
    if not sym:
        assert force.any() and (c.zeros[force] == 0).all() and len(np.unique(c.zeros)) >= 8
    expected = (c.codes.astype(np.float32) - c.zeros[:, g_idx]) * c.scales[:, g_idx]
    if fmt == "ct_int4":
        p = pack_ct_int4(c)
        zp = p.get("weight_zero_point")
        q, z = oracle.unpack_ct_int4(p["weight_packed"], p["weight_shape"], zp)
        assert (sym and z is None) or np.array_equal(z, c.zeros)
        got = oracle.dequant_ct_int4(p["weight_packed"], p["weight_scale"], p["weight_shape"], zp)
    elif fmt.startswith("gptq"):
        p = pack_gptq(c, fmt)
        q, z = oracle.unpack_gptq(p["qweight"], p["qzeros"], fmt)
        assert np.array_equal(z.T, c.zeros) and np.array_equal(p["g_idx"], g_idx)
        got = oracle.dequant_gptq(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], fmt)
    else:
        p = pack_awq(c)
        q, z = oracle.unpack_awq(p["qweight"], p["qzeros"])
        q = q.T
        assert np.array_equal(z.T, c.zeros)
        got = oracle.dequant_awq(p["qweight"], p["qzeros"], p["scales"])
    assert np.array_equal(q, c.codes)
    assert _bitwise_equal(got, expected)


def test_gptq_v1_zero_point_zero_borrows_across_nibbles():
    """GPTQModel's writer subtracts 0x11111111 from the whole word, its reader adds it back:
    a zero point of 0 borrows from its neighbour, so per-nibble `stored + 1` is wrong."""
    zeros = np.array([[0, 5, 8, 15, 0, 0, 1, 2]], dtype=np.uint8)  # [out=8, groups=1]
    c = Int4Codes(np.zeros((8, 32), np.uint8), zeros.T, np.ones((8, 1), np.float32),
                  sequential_g_idx(32, 32), False, "float16")
    word = int(pack_gptq(c, "gptq")["qzeros"].view(np.uint32)[0, 0])
    assert word == 0x2100F850 - 0x11111111 == 0x0FEFE73F
    assert int(pack_gptq(c, "gptq_v2")["qzeros"].view(np.uint32)[0, 0]) == 0x2100F850
    naive = [((word >> (4 * i)) + 1) & 0xF for i in range(8)]
    assert naive != zeros[0].tolist()
    _, z = oracle.unpack_gptq(np.zeros((4, 8), np.int32), np.array([[word]], np.uint32).view(np.int32), "gptq")
    assert z[0].tolist() == zeros[0].tolist()


def test_mxfp4_pack_unpack_round_trip():
    rng = np.random.default_rng(3)
    w = _weights(rng, 64, 256)
    c = quantize_mxfp4(w)
    block_scale = np.ldexp(1.0, c.scales.astype(int) - 127).astype(np.float32)
    expected = oracle.E2M1_VALUES[c.codes] * np.repeat(block_scale, 32, axis=1)
    for packed in (pack_ct_mxfp4(c)["weight_packed"], pack_quark_mxfp4(c)["weight"]):
        assert packed.dtype == np.uint8 and packed.shape == (64, 128)
        assert np.array_equal(oracle.nibbles_of_bytes(packed), c.codes)
        assert _bitwise_equal(oracle.dequant_mxfp4(packed, c.scales), expected)
    fused = quantize_mxfp4(w.reshape(2, 32, 256))
    p = pack_gptoss_experts(fused)
    assert p["blocks"].shape == (2, 32, 8, 16) and p["scales"].shape == (2, 32, 8)
    assert _bitwise_equal(oracle.dequant_gptoss_experts(p["blocks"], p["scales"]), expected.reshape(2, 32, 256))
    assert set(np.unique(c.codes)) == set(range(16))
    assert not (quantize_mxfp4(w, signed_zero=False).codes == 8).any()
    # the MXFP4 error bound: half a step of the block's largest magnitude binade
    err = np.abs(expected - w).reshape(64, 8, 32).max(axis=2)
    assert (err <= block_scale + 1e-12).all()


def test_e2m1_and_bf16_rounding():
    x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.1, -1.25, 0.0, 2.9], np.float32)
    values = oracle.E2M1_VALUES[e2m1_codes(x)]
    assert values.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -1.0, 0.0, 3.0]
    assert e2m1_codes(np.array([-0.1], np.float32))[0] == 8
    f = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.0], np.float32)
    assert oracle.widen(to_bf16_bits(f)).tolist() == [1.0, 1 + 2**-6, 1 + 2**-7, 3.0]


def _nibble_positions(arr: np.ndarray) -> np.ndarray:
    """[n_positions, values]: nibbles of packed words/bytes grouped by position in the word."""
    if arr.dtype == np.uint8:
        return np.stack([arr & 0xF, arr >> 4]).reshape(2, -1)
    w = arr.view(np.uint32).reshape(-1)
    return np.stack([(w >> (4 * p)) & 0xF for p in range(8)])


def _case_id(value) -> str:
    return value if isinstance(value, str) else "-".join(f"{k}={x}" for k, x in value.items())


@pytest.mark.parametrize("fmt,arch,kw", BUILDS, ids=_case_id)
def test_build_exercises_every_code_and_matches_float_weights(tmp_path, fmt, arch, kw):
    built = _build(tmp_path, fmt, arch, **kw)
    info = json.loads((built / "packer_info.json").read_text())
    ckpt = Checkpoint(built)
    ref = _ref(built)
    assert sorted(info["reference_modules"]) == sorted(k[:-7] for k in ref)
    if fmt != "bf16":
        assert sorted(info["quantized_modules"]) == sorted(info["reference_modules"])
    n_attn = 0 if arch == "gpt_oss" else 8
    assert len(ref) == 2 * 8 * 3 + n_attn
    code_suffixes = ("weight_packed", "qweight", "_blocks") + (("weight",) if fmt == "quark_mxfp4" else ())
    packed = [k for k in ckpt.keys() if k.endswith(code_suffixes) and ckpt.dtype(k) in ("I32", "U8")]
    if fmt != "bf16":
        positions = np.concatenate([_nibble_positions(ckpt.get(k)) for k in packed], axis=1)
        for p, values in enumerate(positions):
            assert set(np.unique(values)) == set(range(16)), f"nibble position {p}"
    asym = fmt == "awq" or kw.get("sym") is False
    for k in ckpt.keys():
        if asym and k.endswith(("qzeros", "weight_zero_point")):
            assert len(np.unique(_nibble_positions(ckpt.get(k)))) >= 8, k
        if k.endswith(("scales", "weight_scale", "_scales")):
            assert len(np.unique(ckpt.get(k))) >= 3, k
    if kw.get("zero_point_zero_frac"):
        return  # groups forced to zero point 0 are coded relative to their minimum
    floats = random_model(arch, resolve(fmt, arch, kw))
    naming = Naming(arch, info["options"]["mixtral_naming"] or "original")
    for canonical, w in floats.items():
        name = naming.rename(canonical)
        if name in ref:
            rel = np.abs(ref[name] - w).mean() / np.abs(w).mean()
            assert rel < (0.005 if fmt == "bf16" else 0.2), (name, rel)


def test_sharded_build_splits_by_layer(tmp_path):
    one = Checkpoint(_build(tmp_path / "a", "gptq", "qwen3_moe", **SMALL))
    built = _build(tmp_path / "b", "gptq", "qwen3_moe", shards=3, **SMALL)
    index = json.loads((built / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    shards = Checkpoint(built)
    assert sorted(index["weight_map"]) == sorted(one.keys())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(one.get(k).nbytes for k in one.keys())
    assert all(_bitwise_equal(shards.get(k), one.get(k)) for k in one.keys())
    rank = {"model.embed_tokens.weight": -1, "model.norm.weight": 99, "lm_head.weight": 99}
    order = []
    for i in (1, 2, 3):
        for k in SafetensorsFile(built / f"model-0000{i}-of-00003.safetensors").keys():
            order.append(rank.get(k, int(k.split(".")[2]) if k.startswith("model.layers.") else None))
    assert order == sorted(order)
    safetensors = pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    with safetensors.safe_open(built / "model-00002-of-00003.safetensors", "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            got = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
            assert _bitwise_equal(got, one.get(k)), k


def test_builds_are_deterministic_and_seeded(tmp_path):
    a, b, c = (_build(tmp_path / d, "awq", "qwen3_moe", seed=s, **SMALL) for d, s in (("a", 1), ("b", 1), ("c", 2)))
    for fname in ("model.safetensors", "ref_dequant.safetensors", "config.json", "packer_info.json"):
        assert (a / fname).read_bytes() == (b / fname).read_bytes(), fname
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_desc_act_g_idx_is_scattered_and_shared_by_same_input_modules(tmp_path):
    ckpt = Checkpoint(_build(tmp_path, "gptq", "qwen3_moe", desc_act=True, **SMALL))
    g = {k[: -len(".g_idx")]: ckpt.get(k) for k in ckpt.keys() if k.endswith(".g_idx")}
    e0 = "model.layers.0.mlp.experts.0"
    for g_idx in g.values():
        assert np.array_equal(np.bincount(g_idx), np.full(len(g_idx) // 32, 32))
        assert not np.array_equal(g_idx, np.arange(len(g_idx)) // 32)
    assert np.array_equal(g[f"{e0}.gate_proj"], g[f"{e0}.up_proj"])
    assert not np.array_equal(g[f"{e0}.gate_proj"], g["model.layers.0.mlp.experts.1.gate_proj"])
    attn = "model.layers.0.self_attn"
    assert np.array_equal(g[f"{attn}.q_proj"], g[f"{attn}.k_proj"])
    assert np.array_equal(g[f"{attn}.q_proj"], g[f"{attn}.v_proj"])


@pytest.mark.parametrize("naming,fmt,expert,router", [
    ("original", "bf16", "block_sparse_moe.experts.0.w1.weight", "block_sparse_moe.gate.weight"),
    ("llmcompressor", "ct_int4", "block_sparse_moe.experts.0.gate_proj.weight_packed", "block_sparse_moe.gate.weight"),
    ("gptqmodel", "gptq", "mlp.experts.0.gate_proj.qweight", "mlp.gate.weight"),
    ("original", "awq", "block_sparse_moe.experts.0.w1.qweight", "block_sparse_moe.gate.weight"),
])
def test_mixtral_namings(tmp_path, naming, fmt, expert, router):
    built = _build(tmp_path, fmt, "mixtral", mixtral_naming=naming, **SMALL)
    keys = Checkpoint(built).keys()
    assert f"model.layers.1.{expert}" in keys and f"model.layers.1.{router}" in keys
    info = json.loads((built / "packer_info.json").read_text())
    assert info["routers"][1] == f"model.layers.1.{router[: -len('.weight')]}"
    down = info["moe_blocks"][0]["experts"][3]["down"]
    assert down.endswith("experts.3.w2" if naming == "original" else "experts.3.down_proj")
    assert sum(k.startswith(down + ".") for k in keys) >= 1


def test_quantization_config_variants(tmp_path):
    def config(fmt, arch="qwen3_moe", **kw):
        built = build_checkpoint(tmp_path / str(len(list(tmp_path.iterdir()))), fmt, arch, **SMALL, **kw)
        return json.loads((built / "config.json").read_text())

    def qc(fmt, arch="qwen3_moe", **kw):
        return config(fmt, arch, **kw).get("quantization_config")

    ct = qc("ct_int4", sym=False, quantize_attention=False)
    weights = ct["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is False and weights["zp_dtype"] == "torch.int8"
    assert ct["ignore"][:5] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp.gate"]
    assert ct["ignore"][-1] == "lm_head"
    g = qc("gptq", sym=False, desc_act=True, checkpoint_format="gptq_v2", quantize_attention=False)
    assert (g["sym"], g["desc_act"], g["format"], g["checkpoint_format"]) == (False, True, "gptq_v2", "gptq_v2")
    assert g["dynamic"] == {r"-:.*\.self_attn\..*": {}}
    assert qc("quark_mxfp4", "mixtral")["exclude"] == ["lm_head"]
    assert qc("quark_mxfp4", quark_scheme="mxfp4_weight_only")["global_quant_config"]["input_tensors"] is None
    assert qc("ct_mxfp4")["config_groups"]["group_0"]["weights"]["type"] == "float"
    assert qc("gptoss_mxfp4", "gpt_oss")["quant_method"] == "mxfp4"
    assert qc("bf16") is None
    assert config("awq", scale_dtype="bfloat16")["dtype"] == "bfloat16"
    assert config("awq")["dtype"] == config("ct_int4", scale_dtype="float16")["dtype"] == "float16"


def test_gptoss_layout(tmp_path):
    built = _build(tmp_path, "gptoss_mxfp4", "gpt_oss", **SMALL)
    ckpt = Checkpoint(built)
    p = "model.layers.0.mlp.experts"
    shapes = {k: (ckpt.dtype(k), ckpt.get(k).shape) for k in ckpt.keys() if k.startswith(p)}
    assert shapes == {
        f"{p}.gate_up_proj_blocks": ("U8", (4, 128, 4, 16)),
        f"{p}.gate_up_proj_scales": ("U8", (4, 128, 4)),
        f"{p}.gate_up_proj_bias": ("BF16", (4, 128)),
        f"{p}.down_proj_blocks": ("U8", (4, 128, 2, 16)),
        f"{p}.down_proj_scales": ("U8", (4, 128, 2)),
        f"{p}.down_proj_bias": ("BF16", (4, 128)),
    }
    for k in ("model.layers.0.self_attn.sinks", "model.layers.0.mlp.router.weight", "model.layers.0.mlp.router.bias",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.o_proj.weight"):
        assert ckpt.dtype(k) == "BF16", k
    floats = random_model("gpt_oss", resolve("gptoss_mxfp4", "gpt_oss", SMALL))
    bias = oracle.widen(ckpt.get(f"{p}.gate_up_proj_bias"))
    assert np.array_equal(bias[1, 0::2], oracle.widen(to_bf16_bits(floats[f"{p}.1.gate_proj.bias"])))
    assert np.array_equal(bias[1, 1::2], oracle.widen(to_bf16_bits(floats[f"{p}.1.up_proj.bias"])))
    assert np.array_equal(interleave(np.zeros((1, 2)), np.ones((1, 2)), axis=-1), [[0, 1, 0, 1]])
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] and cfg["swiglu_limit"] == 7.0


@pytest.mark.parametrize("fmt,arch,kw,error", [
    ("nope", "qwen3_moe", {}, ValueError),
    ("gptq", "llama", {}, ValueError),
    ("gptq", "qwen3_moe", {"bits": 3}, TypeError),
    ("awq", "qwen3_moe", {"sym": True}, ValueError),
    ("gptoss_mxfp4", "qwen3_moe", {}, ValueError),
    ("ct_int4", "gpt_oss", {}, ValueError),
    ("gptoss_mxfp4", "gpt_oss", {"quantize_attention": True}, ValueError),
    ("ct_int4", "qwen3_moe", {"desc_act": True}, ValueError),
    ("gptq", "qwen3_moe", {"zero_point_zero_frac": 0.1}, ValueError),
    ("gptq", "qwen3_moe", {"group_size": 48}, ValueError),
    ("quark_mxfp4", "qwen3_moe", {"group_size": 64}, ValueError),
    ("gptq", "qwen3_moe", {"mixtral_naming": "original"}, ValueError),
    ("gptq", "qwen3_moe", {"scale_dtype": "float32"}, ValueError),
])
def test_bad_options_are_refused(tmp_path, fmt, arch, kw, error):
    with pytest.raises(error):
        build_checkpoint(tmp_path, fmt, arch, **kw)


def test_base_weights_shape_mismatch_is_refused(tmp_path):
    base = random_model("qwen3_moe", resolve("bf16", "qwen3_moe", {}))
    with pytest.raises(ValueError, match="shape"):
        build_checkpoint(tmp_path, "gptq", base_weights=base, hidden=128)
    assert set(FORMATS) == {"ct_int4", "ct_mxfp4", "gptq", "awq", "quark_mxfp4", "gptoss_mxfp4", "bf16"}


# (c) transformers loads what we write

def _load(transformers, path: Path, **kw):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kw)
    assert not any(info.values()), info
    return model


def _subset(loaded: dict, written: dict) -> dict:
    """The keys of a loaded config that the written one has (sub-configs likewise), but the
    version: a loaded config carries the loading library's."""
    return {k: _subset(v, written[k]) if isinstance(v, dict) and isinstance(written[k], dict) and k.endswith("_config")
            else v for k, v in loaded.items() if k in written and k != "transformers_version"}


@pytest.mark.parametrize("arch,kw", [("qwen3_moe", {}), ("mixtral", {}), ("gpt_oss", {}), ("qwen3_5_moe", {}),
                                     ("qwen3_5_moe", {"multimodal": True})], ids=_case_id)
def test_transformers_loads_bf16_build(tmp_path, fixtures_dir, arch, kw):
    """Every tensor name and shape, and the config, as transformers' own classes have them; the
    multimodal Qwen3.5 layout through the text class, as transformers loads it for text."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    built = _build(tmp_path, "bf16", arch, tokenizer_dir=fixtures_dir / "base_qwen3moe_bf16", **kw)
    model = _load(transformers, built)
    config = transformers.AutoConfig.from_pretrained(str(built))
    written = json.loads((built / "config.json").read_text())
    loaded = _subset(config.to_dict(), written)
    for cfg in (written, written.get("text_config", {})):
        cfg.pop("transformers_version", None)
    if "vision_config" in written:  # published configs name the tower's type as the model's; transformers renames it
        assert loaded["vision_config"].pop("model_type") == "qwen3_5_moe_vision"
        assert written["vision_config"].pop("model_type") == "qwen3_5_moe"
    assert loaded == written
    fresh = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in fresh.items()}
    ref = _ref(built)
    naming = Naming(arch, "original", kw.get("multimodal", False))
    for layer in range(2):
        gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"].float().numpy()
        down = state[f"model.layers.{layer}.mlp.experts.down_proj"].float().numpy()
        for e in range(8):
            gate, up, dn = (ref[naming.expert(layer, e, p) + ".weight"] for p in ("gate", "up", "down"))
            if arch == "gpt_oss":  # [E, in, out] with interleaved gate/up columns
                assert np.array_equal(gate_up[e].T, interleave(gate, up, axis=0)) and np.array_equal(down[e].T, dn)
            else:
                assert np.array_equal(gate_up[e], np.concatenate([gate, up])) and np.array_equal(down[e], dn)
    tok = transformers.AutoTokenizer.from_pretrained(str(built))
    assert tok.eos_token_id == config.eos_token_id == 0
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 5, 6, 7]])).logits).all()


def test_transformers_dequantizes_gptoss_mxfp4_build_to_our_reference(tmp_path):
    transformers = pytest.importorskip("transformers")
    built = _build(tmp_path, "gptoss_mxfp4", "gpt_oss")
    model = _load(transformers, built, quantization_config=transformers.Mxfp4Config(dequantize=True))
    state, ref = model.state_dict(), _ref(built)
    for layer in range(2):
        gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"].float().numpy()
        down = state[f"model.layers.{layer}.mlp.experts.down_proj"].float().numpy()
        p = f"model.layers.{layer}.mlp.experts"
        for e in range(8):
            assert np.array_equal(gate_up[e][:, 0::2].T, ref[f"{p}.{e}.gate_proj.weight"])
            assert np.array_equal(gate_up[e][:, 1::2].T, ref[f"{p}.{e}.up_proj.weight"])
            assert np.array_equal(down[e].T, ref[f"{p}.{e}.down_proj.weight"])


@pytest.mark.parametrize("fmt,kw", [("ct_int4", {"sym": False}), ("ct_int4", {"sym": False, "scale_dtype": "float16"}),
                                    ("ct_mxfp4", {})])
def test_compressed_tensors_dequantizer_agrees(tmp_path, fmt, kw):
    """Only where compressed-tensors is installed (not a project dependency):
    `pip install --no-deps compressed-tensors==0.19.0 loguru` into a separate path."""
    pytest.importorskip("compressed_tensors")
    torch = pytest.importorskip("torch")
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    built = _build(tmp_path, fmt, "qwen3_moe", **kw)
    tensors = {k: v.float() if k.endswith("weight_scale") and v.is_floating_point() else v
               for k, v in load_file(str(built / "model.safetensors")).items()}
    theirs = CompressedTensorsDequantizer(str(built), dtype=torch.float32).process(tensors)
    for key, ref in _ref(built).items():
        assert _bitwise_equal(theirs[key].numpy(), ref), key
