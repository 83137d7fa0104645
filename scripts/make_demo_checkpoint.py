"""Write the bundled demo checkpoint: a tiny Qwen3-MoE in compressed-tensors W4A16 (pack-quantized
int4, symmetric, bf16 scales, group 32), with a byte-level BPE tokenizer trained here.

Deterministic (fixed seeds, no network): running it again rewrites the same bytes, which
tests/test_commands_demo.py checks. The weights are random, so generations are gibberish by design;
the demo shows the pipeline, not a language model.

    python scripts/make_demo_checkpoint.py [OUT]   # default: examples/demo-qwen3moe-ct-w4a16
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "examples" / "demo-qwen3moe-ct-w4a16"
VOCAB = 320
# Training text for the tokenizer: this project's own description, so nothing is downloaded.
CORPUS = [
    "moeprep converts quantized Mixture-of-Experts checkpoints into preshuffled layouts once, offline.",
    "Return the preshuffled weights; verify that every expert round-trips exactly, bit for bit.",
    "The router picks the top experts for each token; the experts are gate, up and down projections.",
    "def convert(src, out, target): return the converted checkpoint with an index and metadata.",
] * 8


def train_tokenizer(dest: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(dest / "tokenizer.json"))
    config = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(out: Path = DEFAULT_OUT) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from packers import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tok"
        tok_dir.mkdir()
        train_tokenizer(tok_dir)
        vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
        built = build_checkpoint(
            Path(tmp) / "ckpt", "ct_int4", "qwen3_moe",
            num_layers=2, hidden=64, intermediate=64, num_experts=4, top_k=2, vocab=len(vocab),
            heads=2, kv_heads=1, head_dim=32, group_size=32, sym=True, scale_dtype="bfloat16",
            seed=2026, tokenizer_dir=tok_dir,
        )
        for extra in ("ref_dequant.safetensors", "packer_info.json"):
            (built / extra).unlink()
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(built, out)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
