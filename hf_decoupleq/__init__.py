"""hf-decoupleq: decoupleQ 2/3/4-bit weight quantization for Hugging Face transformers.

``import hf_decoupleq`` registers the quantization method ``"decoupleq"`` with transformers, so that
``AutoModelForCausalLM.from_pretrained(..., quantization_config=DecoupleQConfig(...))`` quantizes on load
and ``from_pretrained`` of a saved checkpoint reads the packed weights.

Importing this package does not import transformers by itself: registration happens as soon as
transformers is imported (or right away if it already is), so that the pure-torch parts
(``hf_decoupleq.solver``, ``hf_decoupleq.packing``) stay light to import and reuse.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._registration import install_registration_hook, register

__version__ = "0.1.0"

_LAZY_ATTRS = {
    "DecoupleQConfig": "hf_decoupleq.config",
    "DecoupleQHfQuantizer": "hf_decoupleq.quantizer",
    "DecoupleQLinear": "hf_decoupleq.nn.linear",
    "replace_with_decoupleq_linear": "hf_decoupleq.integration",
    "quantize_model": "hf_decoupleq.pipeline",
    "quantize": "hf_decoupleq.api",
    "prepare_for_training": "hf_decoupleq.training",
    "solve_layer": "hf_decoupleq.solver",
    "HessianAccumulator": "hf_decoupleq.solver",
    "export_gguf": "hf_decoupleq.export",
}

__all__ = [
    "DecoupleQConfig",
    "DecoupleQHfQuantizer",
    "DecoupleQLinear",
    "HessianAccumulator",
    "__version__",
    "export_gguf",
    "prepare_for_training",
    "quantize",
    "quantize_model",
    "register",
    "replace_with_decoupleq_linear",
    "solve_layer",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import quantize
    from .config import DecoupleQConfig
    from .nn.linear import DecoupleQLinear
    from .pipeline import quantize_model
    from .quantizer import DecoupleQHfQuantizer
    from .solver import HessianAccumulator, solve_layer


def __getattr__(name: str):
    module = _LAZY_ATTRS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_decoupleq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


install_registration_hook()
