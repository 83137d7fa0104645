"""A corpus of hostile inputs, each made from a valid checkpoint by one mutation.

Every case names what the refusal must mention: the file (by name) and, where there is one,
the tensor. ``data_level`` cases can only be seen by reading tensor data, which the header-only
``inspect`` never does (by contract), so it is exempt from them.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from safetensors import safe_open
from safetensors.torch import load_file, save_file

SRC_LAYER0 = "model.layers.0.mlp.experts"


@dataclass(frozen=True)
class Hostile:
    id: str
    mutate: Callable[[Path], None]  # edits a copy of the base checkpoint in place
    file: str  # a fragment of the file the error must name
    tensor: Optional[str] = None  # the tensor it must name, if any
    base: str = "source"  # "source" or "converted"
    data_level: bool = False


# --- raw header surgery ----------------------------------------------------------------------


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _edit_header(shard: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        header, data = _split(root / shard)
        fn(header)
        _join(root / shard, header, data)

    return mutate


def _index(root: Path) -> dict:
    return json.loads((root / "model.safetensors.index.json").read_text())


def _write_index(root: Path, index: dict) -> None:
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def shard_of(root: Path, name: str) -> Path:
    return root / _index(root)["weight_map"][name]


def drop_tensor(name: str, reindex: bool) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        shard = shard_of(root, name)
        with safe_open(shard, "pt") as f:
            meta = f.metadata()
        tensors = load_file(shard)
        del tensors[name]
        save_file(tensors, shard, metadata=meta)
        if reindex:
            index = _index(root)
            del index["weight_map"][name]
            _write_index(root, index)

    return mutate


def _replace_tensor(name: str, fn) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        shard = shard_of(root, name)
        with safe_open(shard, "pt") as f:
            meta = f.metadata()
        tensors = load_file(shard)
        tensors[name] = fn(tensors[name])
        save_file(tensors, shard, metadata=meta)

    return mutate


def _config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        cfg = json.loads((root / "config.json").read_text())
        fn(cfg)
        (root / "config.json").write_text(json.dumps(cfg))
        (root / "quantize_config.json").unlink(missing_ok=True)

    return mutate


# --- the mutations ------------------------------------------------------------------------------


def truncate(root: Path) -> None:
    shard = root / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])


def header_beyond_file(root: Path) -> None:
    shard = root / "model-00002-of-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[:8] = (len(raw) + 100).to_bytes(8, "little")
    shard.write_bytes(bytes(raw))


def invalid_json(root: Path) -> None:
    shard = root / "model-00002-of-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"{not json!!!"
    shard.write_bytes(bytes(raw))


def _first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def overlap(header: dict) -> None:
    a, b = _first_two(header)
    begin, end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [begin - 4, end - 4]


def out_of_range(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 1 << 30, end + 1 << 30]


def dtype_disagrees(header: dict) -> None:
    header[f"{SRC_LAYER0}.3.up_proj.qweight"]["dtype"] = "I64"


def missing_shard(root: Path) -> None:
    (root / "model-00002-of-00002.safetensors").unlink()


def duplicate_across_shards(root: Path) -> None:
    name = f"{SRC_LAYER0}.0.gate_proj.scales"
    a = shard_of(root, name)
    b = root / ("model-00002-of-00002.safetensors" if a.name.startswith("model-00001") else "model-00001-of-00002.safetensors")
    with safe_open(a, "pt") as f:
        dup = f.get_tensor(name)
    with safe_open(b, "pt") as f:
        meta = f.metadata()
    tensors = load_file(b)
    tensors[name] = dup
    save_file(tensors, b, metadata=meta)


def unreadable(root: Path) -> None:
    shard = root / "model-00002-of-00002.safetensors"
    if os.geteuid() == 0:  # root reads any file: make it something open() cannot read
        shard.unlink()
        shard.mkdir()
    else:
        shard.chmod(0)


def empty_directory(root: Path) -> None:
    for p in root.iterdir():
        p.unlink()


def _g_idx_bad(t):
    t = t.clone()
    t[0] = t.max() + 5
    return t


def _expert_missing(root: Path) -> None:
    index = _index(root)
    for name in [n for n in index["weight_map"] if n.startswith("model.layers.1.mlp.experts.5.")]:
        drop_tensor(name, reindex=True)(root)


def _scale_shape(t):
    return t[:, :-8].contiguous()


def edit_tensor_meta(root: Path, tensor: str, **changes) -> None:
    """Change keys of one converted tensor's JSON metadata in its shard header."""

    def edit(header: dict) -> None:
        header["__metadata__"][tensor] = json.dumps({**json.loads(header["__metadata__"][tensor]), **changes})

    _edit_header(shard_of(root, tensor).name, edit)(root)


def _metadata_disagrees(root: Path) -> None:
    edit_tensor_meta(root, "model.layers.1.mlp.experts.w2_weight", shape=[8, 256, 32])


def _shuffle_kind_unknown(root: Path) -> None:
    edit_tensor_meta(root, "model.layers.0.mlp.experts.w13_weight_scale", shuffle_kind="nonsense")


def _stored_shape_disagrees(root: Path) -> None:
    _replace_tensor("model.layers.0.mlp.experts.w2_weight_zero_point", lambda t: t[:, :-2].contiguous())(root)


def _unindexed(root: Path) -> None:
    index = _index(root)
    del index["weight_map"][f"{SRC_LAYER0}.4.up_proj.scales"]
    _write_index(root, index)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def config_nested_deeply(root: Path) -> None:
    text = (root / "config.json").read_text().rstrip().rstrip("}")
    (root / "config.json").write_text(text + f', "deep": {_deep(100_000)}}}')


def config_with_nan(root: Path) -> None:
    text = (root / "config.json").read_text().rstrip().rstrip("}")
    (root / "config.json").write_text(text + ', "rope_theta": NaN}')


def index_nested_deeply(root: Path) -> None:
    text = (root / "model.safetensors.index.json").read_text().rstrip().rstrip("}")
    (root / "model.safetensors.index.json").write_text(text + f', "deep": {_deep(100_000)}}}')


def _raw_header(shard: str, fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Edits the header's JSON text itself (what json.dumps cannot write)."""
    def mutate(root: Path) -> None:
        raw = (root / shard).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        text = fn(raw[8 : 8 + n].rstrip())
        text += b" " * (-len(text) % 8)
        (root / shard).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])

    return mutate


def _deep_entry(text: bytes) -> bytes:
    return text[:-1] + b', "deep": {"dtype": "U8", "shape": ' + _deep(100_000).encode() + b', "data_offsets": [0, 0]}}'


def _surrogate_name(text: bytes) -> bytes:
    return text.replace(f'"{SRC_LAYER0}.3.gate_proj.scales"'.encode(), f'"{SRC_LAYER0}.3.gate_proj.scales\\udc80"'.encode())


def _huge_dimension(header: dict) -> None:
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["huge"] = {"dtype": "U8", "shape": [2**64, 0], "data_offsets": [end, end]}


def _one_scale(value: float):
    def edit(t):
        t = t.clone()
        t.view(-1)[3] = value
        return t

    return edit


def _fifo_shard(root: Path) -> None:
    shard = root / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)


CORPUS = [
    Hostile("truncated", truncate, "model-00002-of-00002.safetensors"),
    Hostile("header_beyond_file", header_beyond_file, "model-00002-of-00002.safetensors"),
    Hostile("invalid_header_json", invalid_json, "model-00002-of-00002.safetensors"),
    Hostile("overlapping_offsets", _edit_header("model-00001-of-00002.safetensors", overlap), "model-00001-of-00002.safetensors", tensor=""),
    Hostile("offsets_out_of_range", _edit_header("model-00002-of-00002.safetensors", out_of_range), "model-00002-of-00002.safetensors", tensor=""),
    Hostile("dtype_disagrees_with_bytes", _edit_header("model-00001-of-00002.safetensors", dtype_disagrees), "model-00001-of-00002.safetensors", f"{SRC_LAYER0}.3.up_proj.qweight"),
    Hostile("shard_missing", missing_shard, "model.safetensors.index.json", ""),
    Hostile("in_index_not_in_shard", drop_tensor(f"{SRC_LAYER0}.2.down_proj.qzeros", reindex=False), "model.safetensors.index.json", f"{SRC_LAYER0}.2.down_proj.qzeros"),
    Hostile("in_shard_not_in_index", _unindexed, "model-0000", f"{SRC_LAYER0}.4.up_proj.scales"),
    Hostile("duplicated_across_shards", duplicate_across_shards, "model-0000", f"{SRC_LAYER0}.0.gate_proj.scales"),
    Hostile("missing_scale", drop_tensor(f"{SRC_LAYER0}.6.gate_proj.scales", reindex=True), "", f"{SRC_LAYER0}.6.gate_proj.scales"),
    Hostile("missing_zero_point", drop_tensor(f"{SRC_LAYER0}.6.up_proj.qzeros", reindex=True), "", f"{SRC_LAYER0}.6.up_proj.qzeros"),
    Hostile("missing_g_idx", drop_tensor(f"{SRC_LAYER0}.6.down_proj.g_idx", reindex=True), "", f"{SRC_LAYER0}.6.down_proj.g_idx"),
    Hostile("scale_shape_inconsistent", _replace_tensor(f"{SRC_LAYER0}.1.gate_proj.scales", _scale_shape), "model-0000", f"{SRC_LAYER0}.1.gate_proj.scales"),
    Hostile("group_size_not_dividing_k", _config(lambda c: c["quantization_config"].update(group_size=48)), "model-0000", tensor=""),
    Hostile("g_idx_not_a_group_map", _replace_tensor(f"{SRC_LAYER0}.7.down_proj.g_idx", _g_idx_bad), "model-0000", f"{SRC_LAYER0}.7.down_proj.g_idx", data_level=True),
    Hostile("expert_count_config_larger", _config(lambda c: c.update(num_local_experts=16)), "", "model.layers.0.mlp.experts.8"),
    Hostile("expert_count_config_smaller", _config(lambda c: c.update(num_local_experts=4)), "", "model.layers.0.mlp.experts.7"),
    Hostile("expert_missing_from_one_layer", _expert_missing, "", "model.layers.1.mlp.experts.5"),
    Hostile("unknown_quant_method", _config(lambda c: c["quantization_config"].update(quant_method="hqq")), "config.json"),
    Hostile("unsupported_bits", _config(lambda c: c["quantization_config"].update(bits=8)), "config.json"),
    Hostile("empty_directory", empty_directory, "config.json"),
    Hostile("unreadable_file", unreadable, "model-00002-of-00002.safetensors"),
    Hostile("config_nested_deeply", config_nested_deeply, "config.json"),
    Hostile("config_with_nan", config_with_nan, "config.json"),
    Hostile("index_nested_deeply", index_nested_deeply, "model.safetensors.index.json"),
    Hostile("header_nested_deeply", _raw_header("model-00001-of-00002.safetensors", _deep_entry), "model-00001-of-00002.safetensors"),
    Hostile("tensor_name_not_utf8", _raw_header("model-00001-of-00002.safetensors", _surrogate_name), "model-00001-of-00002.safetensors"),
    Hostile("dimension_of_2_64", _edit_header("model-00002-of-00002.safetensors", _huge_dimension), "model-00002-of-00002.safetensors", "huge"),
    Hostile("fifo_as_shard", _fifo_shard, "model-00002-of-00002.safetensors"),
    Hostile("expert_count_10_12", _config(lambda c: c.update(num_local_experts=10**12)), "", "model.layers.0.mlp.experts.8"),
    Hostile("scale_nan", _replace_tensor(f"{SRC_LAYER0}.2.up_proj.scales", _one_scale(float("nan"))), "model-0000", f"{SRC_LAYER0}.2.up_proj.scales", data_level=True),
    Hostile("scale_infinite", _replace_tensor(f"{SRC_LAYER0}.2.down_proj.scales", _one_scale(float("inf"))), "model-0000", f"{SRC_LAYER0}.2.down_proj.scales", data_level=True),
    Hostile("scale_zero", _replace_tensor(f"{SRC_LAYER0}.5.gate_proj.scales", _one_scale(0.0)), "model-0000", f"{SRC_LAYER0}.5.gate_proj.scales", data_level=True),
    Hostile("scale_negative", _replace_tensor("model.layers.1.self_attn.q_proj.scales", _one_scale(-0.5)), "model-0000", "model.layers.1.self_attn.q_proj.scales", data_level=True),
    Hostile("converted_metadata_disagrees", _metadata_disagrees, "model-0000", "model.layers.1.mlp.experts.w2_weight", base="converted"),
    Hostile("converted_unknown_shuffle_kind", _shuffle_kind_unknown, "model-0000", "model.layers.0.mlp.experts.w13_weight_scale", base="converted"),
    Hostile("converted_stored_shape_disagrees", _stored_shape_disagrees, "model-0000", "model.layers.0.mlp.experts.w2_weight_zero_point", base="converted"),
]
CORPUS_IDS = [h.id for h in CORPUS]
BY_ID = {h.id: h for h in CORPUS}


def make(case: Hostile, base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    case.mutate(dest)
    return dest
