"""Run converted checkpoints in Hugging Face transformers (optional extra ``hf``).

``import moeprep`` registers moeprep's quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(OUT)`` builds the model with moeprep's MoE blocks over the
preshuffled bytes (:mod:`moeprep.hf.quantizer`); ``load_model`` and ``generate`` wrap that.
"""
from __future__ import annotations

import os

import torch

from ..arch import detect_architecture
from ..errors import BadInputError, MoeprepError, UnsupportedError
from ..io.checkpoint import Checkpoint
from ..io.hub import HubOptions


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoeprepError("moeprep.hf needs transformers: pip install 'moeprep[hf]'") from None
    return transformers


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    hub: HubOptions = HubOptions(),
):
    """``AutoModelForCausalLM.from_pretrained`` of a converted checkpoint (a directory or a hub id,
    resolved as every moeprep command resolves it), its MoE blocks computing with ``backend``."""
    transformers = _transformers()
    from .quantizer import moe_blocks  # importing it registers the quantization method

    ckpt = Checkpoint(path, hub)
    device = torch.device(device)
    # transformers places a model on a device through accelerate (the extra `hf` brings it)
    placement = {} if device.type == "cpu" else {"device_map": str(device)}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(ckpt.root), config=_config(transformers, ckpt), dtype=dtype, **placement
    )
    for block in moe_blocks(model):
        block.use_backend(backend)
    return model.eval()


def _config(transformers, ckpt: Checkpoint):
    """The checkpoint's transformers config; a ``model_type`` transformers does not know but moeprep
    knows as an alias of a family it implements (``kimi_k2`` of DeepSeek-V3) is read as that family."""
    mapping = transformers.CONFIG_MAPPING
    model_type = ckpt.config.get("model_type")
    if model_type in mapping:
        return transformers.AutoConfig.from_pretrained(str(ckpt.root))
    arch = detect_architecture(ckpt.config)
    if arch.name not in mapping:
        raise UnsupportedError(f"transformers {transformers.__version__} has no model for {model_type!r}",
                               path=str(ckpt.root / "config.json"))
    return mapping[arch.name].from_dict(ckpt.config)


def generate(path: str | os.PathLike, prompt: str, max_new_tokens: int = 32, device: str = "cpu",
             dtype: torch.dtype = torch.float32, hub: HubOptions = HubOptions()) -> str:
    """Greedy generation with the checkpoint's own tokenizer; returns the prompt plus new text."""
    transformers = _transformers()
    model = load_model(path, dtype=dtype, device=device, hub=hub)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model.config.name_or_path)
    except Exception as e:
        raise BadInputError(f"no usable tokenizer: {type(e).__name__}: {e}", path=str(path)) from None
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)

