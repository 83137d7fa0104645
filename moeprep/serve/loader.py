"""``moeprep.load``: open a converted checkpoint for serving.

Tensors come straight from the shards' memory maps (``safe_open``), one transfer per tensor to
the device, and stay in their stored, preshuffled layout. Opening checks the whole checkpoint's
metadata against its headers (format version, ``shuffle_kind``, layout parameters, unpadded
shapes) and refuses anything that is not a moeprep checkpoint it can serve.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import torch

from ..canonical import dequantize
from ..converted import Converted
from ..errors import BadInputError, UnsupportedError
from ..io.checkpoint import Checkpoint
from ..io.hub import HubOptions
from ..model import ModelMap, build_model_map
from ..moe import ExpertWeights
from .tags import tag


class LoadedCheckpoint:
    """A converted checkpoint opened for serving; tensors load on first access and are cached."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", hub: HubOptions = HubOptions()):
        self.device = torch.device(device)
        ckpt = Checkpoint(path, hub)
        model = build_model_map(ckpt)
        if not isinstance(model.fmt, Converted):
            raise UnsupportedError(
                f"not a converted checkpoint ({model.fmt.name}); run `moeprep convert` on it first",
                path=str(ckpt.root / "config.json"),
            )
        self.model: ModelMap = model
        self.fmt: Converted = model.fmt
        self.config = ckpt.config
        self.target = self.fmt.target
        self.shuffle_kind = self.target.name
        self._expert_tensor_names = set(model.expert_tensors())
        self._others = {ref.module: ref for ref in model.other_linears}
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def root(self):
        return self.model.ckpt.root

    def keys(self) -> list[str]:
        return self.model.ckpt.names()

    def __contains__(self, name: str) -> bool:
        return name in self.model.ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            t = self.model.ckpt.get_tensor(name).to(self.device)
            if name in self._expert_tensor_names:
                t = tag(t, self.shuffle_kind)
            self._cache[name] = t
        return t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self[name]

    def moe_layer_indices(self) -> list[int]:
        return [layer.index for layer in self.model.moe_layers]

    def experts(self, layer_idx: int) -> ExpertWeights:
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool):
            raise BadInputError(f"a layer index is an int, got {layer_idx!r}", path=str(self.root))
        layer = next((l for l in self.model.moe_layers if l.index == layer_idx), None)
        if layer is None:
            raise BadInputError(f"no MoE layer {layer_idx} (MoE layers: {self.moe_layer_indices()})", path=str(self.root))
        info = self.fmt.layer(self.model.ckpt, layer.prefix)
        tensors = {role: self[name] for role, name in info.tensors.items()}
        return ExpertWeights(layer.prefix, info.plan, self.target, tensors, info.row_perm)

    def dense_weight(self, module: str) -> Optional[torch.Tensor]:
        """The fp32 weight ``[out, in]`` of a linear outside the routed experts (a shared expert, a
        dense MLP projection): dequantized exactly where the checkpoint quantized it, as stored
        where it did not; None where there is no such module."""
        ref = self._others.get(module)
        if ref is not None:
            return dequantize(self.model.read(ref)).to(self.device)
        name = f"{module}.weight"
        return self[name].as_subclass(torch.Tensor).float() if name in self else None

    def release(self) -> None:
        self._cache.clear()
        self.model.ckpt.release()


def load(path: str | os.PathLike, device: str | torch.device = "cpu", hub: HubOptions = HubOptions()) -> LoadedCheckpoint:
    """Open a checkpoint written by ``moeprep convert`` (directory or hub repo id)."""
    return LoadedCheckpoint(path, device, hub)
