"""vLLM plugin: serve converted checkpoints as they are (entry point group ``vllm.general_plugins``).

``quant_method: "moeprep"`` in a converted checkpoint's config selects :class:`MoeprepConfig`.
Layers outside the MoE blocks go to the source checkpoint's own quantization method (its config is
kept as ``source_quantization_config``) on a GPU; on a CPU, where vLLM's kernels for those formats
need fp16/bf16 and AVX-512 BF16, moeprep dequantizes them exactly once at load. Each MoE layer's
experts get :class:`MoeprepMoEMethod`: parameters of the stored names, shapes and dtypes (``w13_weight``, ``w13_weight_scale``, ...),
tagged ``is_shuffled`` / ``shuffle_kind``, filled with the stored bytes as they are: the plugin
takes them out of vLLM's weight stream and places them itself (each model's own loader knows
only its HF expert names, per expert or stacked, and would drop ours or copy them into parameters
of another shape). vLLM routes; moeprep computes the experts on the preshuffled bytes.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import get_quantization_config, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.platforms import current_platform

from .canonical import dequantize
from .errors import BadInputError, MoeprepError, UnsupportedError
from .io.hub import HubOptions
from .moe import Activation, ExpertWeights
from .partition import Partition, check_partition, local_choices, local_plan, slice_stored
from .serve.loader import LoadedCheckpoint, load
from .serve.moe_block import ChosenExperts
from .serve.tags import tag

QUANT_METHOD = "moeprep"
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class MoeprepConfig(QuantizationConfig):
    """The ``quantization_config`` of a converted checkpoint."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self._source: Optional[QuantizationConfig] = None
        self._mappers: list = []
        self.path: Optional[str] = None
        self.revision: Optional[str] = None
        self.hf_config = None
        self._loaded: Optional[LoadedCheckpoint] = None

    def __getstate__(self):  # the open checkpoint and vLLM's source config stay in the process that made them
        return {**self.__dict__, "_loaded": None, "_source": None}

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MoeprepConfig":
        if config.get("fused_shared_experts"):  # vLLM's models compute shared experts in modules of their own
            raise UnsupportedError("converted with --fuse-shared-experts: vLLM's models load shared experts as modules "
                                   "of their own, which this checkpoint stacks with the routed experts; convert "
                                   "without --fuse-shared-experts to serve it with vLLM", path="config.json")
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: Optional[str] = None):
        """The converted checkpoint, opened (headers checked) before vLLM builds the model."""
        self.path, self.revision, self.hf_config = model_name, revision, hf_config
        self.checkpoint()

    def checkpoint(self) -> LoadedCheckpoint:
        if self._loaded is None:
            if self.path is None:
                raise MoeprepError("moeprep's vLLM config was not given the checkpoint's path")
            self._loaded = load(self.path, hub=HubOptions(revision=self.revision))
        return self._loaded

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self._mappers.append(hf_to_vllm_mapper)

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Every stored tensor reaches its layer: a desc_act ``g_idx`` is part of the source format."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def source(self) -> Optional[QuantizationConfig]:
        """vLLM's own config of the source format, for the layers outside the experts on a GPU (built
        when first needed: on a CPU moeprep serves them itself, whatever vLLM's support for the format)."""
        qc = self.config.get("source_quantization_config")
        if self._source is None and isinstance(qc, dict) and qc.get("quant_method"):
            try:
                source = get_quantization_config(qc["quant_method"]).from_config(qc)
                source.packed_modules_mapping = self.packed_modules_mapping
                for mapper in self._mappers:
                    source.apply_vllm_mapper(mapper)
                source.maybe_update_config(self.path, hf_config=self.hf_config, revision=self.revision)
            except (ValueError, NotImplementedError) as e:
                raise UnsupportedError(f"vLLM cannot serve the source format of the layers outside the experts: {e}",
                                       path=str(self.path)) from None
            self._source = source
        return self._source

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            return MoeprepMoEMethod(self, layer, prefix)
        if isinstance(layer, LinearBase) and current_platform.is_cpu():
            modules = self.packed_modules(prefix)
            quantized = {ref.module for ref in self.checkpoint().model.other_linears}
            if any(m in quantized for m in modules):
                return MoeprepDequantLinearMethod(self, prefix, modules)
            return UnquantizedLinearMethod()
        if current_platform.is_cpu():
            return None
        source = self.source()
        return source.get_quant_method(layer, prefix) if source is not None else None

    def packed_modules(self, prefix: str) -> list[str]:
        """The checkpoint's modules that vLLM packs into its layer ``prefix`` (``qkv_proj`` holds
        ``q_proj``, ``k_proj`` and ``v_proj``), in shard order."""
        parent, _, name = prefix.rpartition(".")
        return [f"{parent}.{m}" if parent else m for m in self.packed_modules_mapping.get(name, [name])]

    def moe_layer(self, prefix: str) -> str:
        """The checkpoint's MoE block behind vLLM's experts module ``prefix`` (by decoder layer index:
        vLLM may name the modules above it differently)."""
        blocks = {layer.index: layer.prefix for layer in self.checkpoint().model.moe_layers}
        m = LAYER_INDEX.search(prefix)
        if m is None or int(m.group(1)) not in blocks:
            raise BadInputError(f"vLLM asks for MoE experts at {prefix}, which the checkpoint does not have "
                                f"(its MoE layers: {sorted(blocks)})", path=str(self.path))
        return blocks[int(m.group(1))]


class MoeprepDequantLinearMethod(LinearMethodBase):
    """A quantized linear outside the experts, dequantized exactly by moeprep's reader of the source
    format from the tensors vLLM loads (each part of each packed module collected as it arrives)."""

    SHARDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, config: MoeprepConfig, prefix: str, modules: list[str]):
        self.config, self.prefix, self.modules = config, prefix, modules
        others = {ref.module: ref for ref in config.checkpoint().model.other_linears}
        missing = [m for m in modules if m not in others]
        if missing:
            raise BadInputError(f"vLLM packs {', '.join(modules)} into {prefix}; the checkpoint has no quantized {missing[0]}",
                                path=str(config.path), tensor=missing[0])
        self.refs = [others[m] for m in modules]
        self.collected: dict[str, torch.Tensor] = {}

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise UnsupportedError("moeprep dequantizes the quantized linears of a CPU model at tensor-parallel size 1 only",
                                   path=str(self.config.path), tensor=self.prefix)
        self.dtype = params_dtype
        suffixes = {name[len(ref.module) + 1:] for ref in self.refs for name in ref.parts.values()} - {"bias"}
        for suffix in sorted(suffixes):
            param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            param.weight_loader = self._collector(suffix)
            layer.register_parameter(suffix, param)
        self.suffixes = suffixes

    def _collector(self, suffix: str):
        def collect(param, loaded_weight: torch.Tensor, shard_id=None) -> None:
            index = self.SHARDS.get(shard_id, shard_id) if shard_id is not None else 0
            name = f"{self.modules[index]}.{suffix}"
            if name not in self.config.checkpoint().model.ckpt:
                raise BadInputError(f"vLLM loads it into {self.prefix}, the checkpoint has no such tensor", path=str(self.config.path), tensor=name)
            self.collected[name] = loaded_weight
        return collect

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        model = self.config.checkpoint().model
        for ref in self.refs:
            for name in ref.parts.values():
                if name not in self.collected and not name.endswith(".bias"):
                    raise BadInputError("stored tensor was not loaded", path=str(self.config.path), tensor=name)
        model.ckpt.supply(self.collected)
        weight = torch.cat([dequantize(model.read(ref), self.dtype) for ref in self.refs])
        for suffix in self.suffixes:
            delattr(layer, suffix)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.collected = {}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class MoeprepMoEMethod(FusedMoEMethodBase):
    """Experts over the stored, preshuffled tensors of one MoE layer."""

    def __init__(self, config: MoeprepConfig, layer: RoutedExperts, prefix: str):
        super().__init__(layer.moe_config)
        self.config = config
        self.prefix = prefix
        self.ckpt_prefix = config.moe_layer(prefix)
        parallel = layer.moe_config.moe_parallel_config
        self.partition = Partition(tp_size=parallel.tp_size, tp_rank=parallel.tp_rank,
                                   ep_size=parallel.ep_size, ep_rank=parallel.ep_rank, use_ep=parallel.use_ep)
        self.expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.loaded: set[str] = set()
        self.compute: Optional[ChosenExperts] = None

    def create_weights(self, layer: RoutedExperts, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra: Any) -> None:
        loaded = self.config.checkpoint()
        ckpt = loaded.model.ckpt
        info = loaded.fmt.layer(ckpt, self.ckpt_prefix)
        self.target, self.full_plan, where = loaded.target.name, info.plan, f"{self.ckpt_prefix}.experts"
        check_partition(self.partition, self.target, info.plan, info.tensors, info.row_perm is not None, where)
        self.plan = local_plan(info.plan, self.partition)
        for role, name in info.tensors.items():
            dtype = getattr(torch, ckpt.info(name).torch_dtype_name)
            local = self.share(torch.empty(ckpt.info(name).shape, dtype=dtype, device="meta"), role)
            param = torch.nn.Parameter(torch.empty(local.shape, dtype=dtype), requires_grad=False)
            param.is_shuffled = True
            param.shuffle_kind = self.target
            layer.register_parameter(role, param)
            self.expected[role] = (tuple(local.shape), dtype)
        mine = self.partition.experts(info.plan.shapes["w13"].experts)
        self.row_perm = None if info.row_perm is None else info.row_perm[mine.start:mine.stop]

    def share(self, tensor: torch.Tensor, role: str) -> torch.Tensor:
        """This rank's share of a stored tensor of the layer."""
        return slice_stored(tensor, role, self.target, self.full_plan, self.partition, f"{self.ckpt_prefix}.experts.{role}")

    def load(self, layer: RoutedExperts, name: str, tensor: torch.Tensor) -> None:
        """One stored tensor of this layer, as it is (this rank's share of it)."""
        where = dict(path=str(self.config.path), tensor=f"{self.ckpt_prefix}.experts.{name}")
        if name not in self.expected:
            raise BadInputError(f"not a stored expert tensor of this layer (expected {sorted(self.expected)})", **where)
        local = self.share(tensor, name)
        shape, dtype = self.expected[name]
        if tuple(local.shape) != shape or local.dtype != dtype:
            raise BadInputError(f"is {local.dtype} {list(local.shape)}, expected {dtype} {list(shape)}", **where)
        getattr(layer, name).data.copy_(local)
        self.loaded.add(name)

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        missing = sorted(set(self.expected) - self.loaded)
        if missing:
            raise BadInputError("stored expert tensor was not loaded", path=str(self.config.path),
                                tensor=f"{self.ckpt_prefix}.experts.{missing[0]}")
        target = self.config.checkpoint().target
        tensors = {role: tag(getattr(layer, role).data, target.name) for role in self.expected}
        experts = ExpertWeights(self.ckpt_prefix, self.plan, target, tensors, self.row_perm)
        self.compute = ChosenExperts(experts, self.activation(layer))

    def get_fused_moe_quant_config(self, layer: RoutedExperts):
        return None

    def activation(self, layer: RoutedExperts) -> Activation:
        kind = layer.activation.value
        if kind == "silu":
            return Activation("silu")
        if kind == "swigluoai":
            return Activation("swiglu_oai", float(layer.swiglu_alpha or 1.702), float(layer.swiglu_limit or 7.0))
        raise UnsupportedError(f"moeprep's experts have no {kind!r} activation", path=str(self.config.path),
                               tensor=f"{self.ckpt_prefix}.experts")

    def apply(self, layer: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        if layer.expert_map is None:
            return self.compute(x, topk_weights, topk_ids)
        # expert parallelism: global ids -> this rank's, -1 for another rank's
        weights, ids = local_choices(topk_weights, layer.expert_map[topk_ids.long()], self.plan.shapes["w13"].experts)
        return self.compute(x, weights, ids)


def _expert_tensors(model: torch.nn.Module) -> dict[str, tuple["MoeprepMoEMethod", RoutedExperts, str]]:
    """The stored expert tensors a model's moeprep MoE layers hold, by checkpoint name."""
    found = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, RoutedExperts) and isinstance(method, MoeprepMoEMethod):
            for role in method.expected:
                found[f"{method.ckpt_prefix}.experts.{role}"] = (method, module, role)
    return found


def _loading_expert_tensors(get_all_weights):
    """vLLM's loader with the moeprep expert tensors taken out of the stream and placed by the MoE
    method itself: each model's own load_weights knows only its HF expert names (per expert or
    stacked) and would drop ours, or copy them into parameters of another shape."""

    def wrapped(self, model_config, model):
        experts = _expert_tensors(model)
        for name, tensor in get_all_weights(self, model_config, model):
            target = experts.get(name)
            if target is None:
                yield name, tensor
            else:
                method, layer, role = target
                method.load(layer, role, tensor)

    wrapped.moeprep = True
    return wrapped


def register() -> None:
    """The plugin's entry point: vLLM calls it in every process it starts."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(MoeprepConfig)
    if not getattr(DefaultModelLoader.get_all_weights, "moeprep", False):
        DefaultModelLoader.get_all_weights = _loading_expert_tensors(DefaultModelLoader.get_all_weights)
