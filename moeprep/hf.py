"""Run a converted checkpoint as a Hugging Face transformers model (optional extra ``hf``).

The model is built from its config on the meta device (no dense expert weights are ever
allocated), every MoE block is replaced by moeprep's own module over the preshuffled tensors,
and every other weight is loaded from the checkpoint: plain tensors as stored, quantized
attention and other linears dequantized by moeprep's readers, all in the requested dtype.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from .canonical import dequantize
from .errors import BadInputError, MoeprepError
from .io.checkpoint import HubOptions
from .serve.loader import LoadedCheckpoint, load
from .serve.moe_block import MoEBlock, build_moe_block

# Checkpoint module names that transformers 5 renames on load (its conversion mapping).
LEGACY_RENAMES = {"mixtral": ((".block_sparse_moe.", ".mlp."),)}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoeprepError("moeprep.hf needs transformers: pip install 'moeprep[hf]'") from None
    return transformers


class HFMoEBlock(nn.Module):
    """Adapts ``MoEBlock`` ([T, H] -> [T, H]) to the calling convention of the block it replaces."""

    def __init__(self, block: MoEBlock, returns_router_scores: bool):
        super().__init__()
        self.block = block
        self.returns_router_scores = returns_router_scores

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        out = self.block(hidden_states.reshape(-1, shape[-1])).reshape(shape).to(hidden_states.dtype)
        return (out, None) if self.returns_router_scores else out


def _hf_module(model: nn.Module, prefix: str, arch: str) -> str:
    """Where the checkpoint's MoE block ``prefix`` lives in the transformers model."""
    candidates = [prefix] + [(prefix + ".").replace(old, new)[:-1] for old, new in LEGACY_RENAMES.get(arch, ())]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    raise MoeprepError(f"{type(model).__name__} has no module {prefix} for the MoE block")


def _hf_name(name: str, arch: str, known: set[str]) -> str:
    if name in known:
        return name
    for old, new in LEGACY_RENAMES.get(arch, ()):
        renamed = name.replace(old, new)
        if renamed in known:
            return renamed
    return name


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    hub: HubOptions = HubOptions(),
):
    """A transformers causal LM whose MoE blocks run on moeprep's preshuffled weights."""
    transformers = _transformers()
    device = torch.device(device)
    loaded = load(path, device, hub)
    arch = loaded.model.arch.name
    config = transformers.AutoConfig.from_pretrained(loaded.root)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # moeprep serves the weights; transformers must not quantize
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    moe_paths = {layer.index: _hf_module(model, layer.prefix, arch) for layer in loaded.model.moe_layers}
    for hf_path in moe_paths.values():
        model.set_submodule(hf_path, nn.Identity())
    model.to_empty(device=device)
    _rebuild_nonpersistent_buffers(model, device)

    state = _dense_state(loaded, dtype, arch, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if unexpected:
        raise BadInputError(f"tensor not used by {type(model).__name__}", path=str(loaded.root), tensor=unexpected[0])
    if missing:
        raise BadInputError(f"weight missing from the checkpoint for {type(model).__name__}", path=str(loaded.root), tensor=missing[0])
    for index, hf_path in moe_paths.items():
        block = build_moe_block(loaded, index, dtype, backend)
        model.set_submodule(hf_path, HFMoEBlock(block, returns_router_scores=arch == "gpt_oss"))
    return model.eval()


def _dense_state(loaded: LoadedCheckpoint, dtype: torch.dtype, arch: str, known: set[str]) -> dict[str, torch.Tensor]:
    """Every non-MoE weight, named as the transformers model names it, in ``dtype``."""
    model = loaded.model
    routers = {f"{layer.prefix}.{r}" for layer in model.moe_layers for r in model.arch.router_names}
    state: dict[str, torch.Tensor] = {}
    for name in model.plain:
        if name.rsplit(".", 1)[0] in routers:
            continue
        t = loaded[name]
        state[_hf_name(name, arch, known)] = t.to(dtype) if t.is_floating_point() else t
    for ref in model.other_linears:
        ql = model.read(ref)
        state[_hf_name(f"{ref.module}.weight", arch, known)] = dequantize(ql, dtype).to(loaded.device)
        if ql.bias is not None:
            state[_hf_name(f"{ref.module}.bias", arch, known)] = ql.bias.to(device=loaded.device, dtype=dtype)
    return state


def _rebuild_nonpersistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers computed at construction (rotary inverse frequencies) are not in any checkpoint:
    recompute them on the real device instead of leaving ``to_empty``'s garbage."""
    for name, module in list(model.named_modules()):
        transient = getattr(module, "_non_persistent_buffers_set", set())
        if not transient:
            continue
        config: Optional[object] = getattr(module, "config", None)
        if config is None:
            raise MoeprepError(f"cannot rebuild the computed buffers of {name} ({type(module).__name__})")
        fresh = type(module)(config).to(device)
        for buf in transient:
            setattr(module, buf, getattr(fresh, buf))
        for attr, value in vars(fresh).items():
            if not attr.startswith("_") and not isinstance(value, (torch.Tensor, nn.Module)):
                setattr(module, attr, value)


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

