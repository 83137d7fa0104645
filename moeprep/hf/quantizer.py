"""moeprep's quantization method for Hugging Face transformers.

``quant_method: "moeprep"`` in a converted checkpoint's config selects :class:`MoeprepHfQuantizer`
(registered by ``import moeprep``). Before loading, every MoE block and every quantized linear
outside them is replaced by a placeholder whose parameters are the checkpoint's own tensors under
that module, with their stored names, shapes and dtypes, so transformers' loader reads the bytes
as they are and reports no missing or unexpected keys. After loading, each placeholder becomes
the module that computes with those bytes: moeprep's MoE block over the preshuffled experts, or
a linear dequantized exactly by moeprep's reader of the source format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..canonical import dequantize
from ..errors import BadInputError, MoeprepError
from ..serve.loader import LoadedCheckpoint, load
from ..serve.moe_block import MoEBlock, build_moe_block

QUANT_METHOD = "moeprep"

# Checkpoint module names that transformers renames on load (its conversion mapping): Mixtral's
# original block name, and the language model of Qwen3.5's multimodal layout, which its text class
# loads without the language_model prefix.
LEGACY_RENAMES = {"mixtral": ((".block_sparse_moe.", ".mlp."),),
                  "qwen3_5_moe": (("model.language_model.", "model."),)}


class MoeprepConfig(QuantizationConfigMixin):
    """The ``quantization_config`` that ``moeprep convert`` writes, kept as it is."""

    def __init__(self, **kwargs: Any):
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class StoredTensors(nn.Module):
    """Stands in for a module until its stored tensors are loaded: one parameter per tensor of the
    checkpoint under the module (``experts.w13_weight``, ``gate.weight``, ...), as stored."""

    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        for relative, (shape, dtype) in tensors.items():
            *path, leaf = relative.split(".")
            module: nn.Module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False))


class HFMoEBlock(nn.Module):
    """Adapts ``MoEBlock`` ([T, H] -> [T, H]) to the calling convention of the block it replaces."""

    def __init__(self, block: nn.Module, returns_router_scores: bool):
        super().__init__()
        self.block = block
        self.returns_router_scores = returns_router_scores

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        out = self.block(hidden_states.reshape(-1, shape[-1])).reshape(shape).to(hidden_states.dtype)
        return (out, None) if self.returns_router_scores else out


def _hf_path(model: nn.Module, module: str, arch: str) -> str:
    """Where the checkpoint's module ``module`` lives in the transformers model."""
    candidates = [module] + [(module + ".").replace(old, new)[:-1] for old, new in LEGACY_RENAMES.get(arch, ())]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    raise MoeprepError(f"{type(model).__name__} has no module {module}")


class MoeprepHfQuantizer(HfQuantizer):
    """Loads a converted checkpoint's stored bytes and serves them with moeprep's modules."""

    requires_calibration = True  # moeprep only loads what `moeprep convert` wrote; it never quantizes a model

    def __init__(self, quantization_config: MoeprepConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.loaded: LoadedCheckpoint | None = None
        self.placed: dict[str, str] = {}  # transformers module path -> checkpoint module
        self.dtype = torch.float32

    def validate_environment(self, device_map=None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise MoeprepError("moeprep checkpoints cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs: Any):
        root = Path(checkpoint_files[0]).parent if checkpoint_files else model.config.name_or_path
        with torch.device("cpu"):  # transformers builds the model under a meta-device context
            self.loaded = loaded = load(root)
        self.dtype = dtype or torch.get_default_dtype()
        arch, ckpt = loaded.model.arch.name, loaded.model.ckpt
        blocks = [layer.prefix for layer in loaded.model.moe_layers]
        linears = [ref.module for ref in loaded.model.other_linears
                   if not any(ref.module.startswith(p + ".") for p in blocks)]
        for module in blocks + linears:
            hf_path = _hf_path(model, module, arch)
            under = {name[len(module) + 1:]: name for name in ckpt.names() if name.startswith(module + ".")}
            stored = {rel: (tuple(ckpt.info(n).shape), getattr(torch, ckpt.info(n).torch_dtype_name)) for rel, n in under.items()}
            model.set_submodule(hf_path, StoredTensors(stored))
            self.placed[hf_path] = module
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        loaded = self.loaded
        ckpt, arch = loaded.model.ckpt, loaded.model.arch.name
        supplied = {}
        for hf_path, module in self.placed.items():
            for rel, param in model.get_submodule(hf_path).named_parameters():
                name = f"{module}.{rel}"
                # transformers marks what its loader placed; whatever it did not place, it fills with
                # initialised or uninitialised memory instead
                if param.is_meta or not getattr(param, "_is_hf_initialized", False):
                    raise BadInputError("stored tensor was not loaded", path=str(ckpt.file_of(name)), tensor=name)
                supplied[name] = param.data
        ckpt.supply(supplied)
        device = next(iter(supplied.values())).device if supplied else torch.device("cpu")
        loaded.device = device
        blocks = {layer.prefix: layer.index for layer in loaded.model.moe_layers}
        others = {ref.module: ref for ref in loaded.model.other_linears}
        for hf_path, module in self.placed.items():
            if module in blocks:
                block = build_moe_block(loaded, blocks[module], self.dtype, "auto")
                model.set_submodule(hf_path, HFMoEBlock(block, returns_router_scores=arch == "gpt_oss"))
            else:
                model.set_submodule(hf_path, self._linear(others[module], device))
        loaded.release()
        self.loaded = None
        return model

    def _linear(self, ref, device: torch.device) -> nn.Linear:
        ql = self.loaded.model.read(ref)
        weight = dequantize(ql, self.dtype).to(device)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=ql.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if ql.bias is not None:
            linear.bias = nn.Parameter(ql.bias.to(device=device, dtype=self.dtype), requires_grad=False)
        return linear

    def is_serializable(self, **kwargs: Any) -> bool:
        return False  # the source of a converted model is its checkpoint: `moeprep convert` writes it

    @property
    def is_trainable(self) -> bool:
        return False


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """moeprep's MoE blocks in a model built by this quantizer."""
    return [m.block for m in model.modules() if isinstance(m, HFMoEBlock) and isinstance(m.block, MoEBlock)]


def register() -> None:
    """Make ``quant_method: "moeprep"`` known to transformers (once; importing this module does it)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(MoeprepConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(MoeprepHfQuantizer)


register()
