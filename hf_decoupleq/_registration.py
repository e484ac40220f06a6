"""Registers ``"decoupleq"`` with transformers' quantizer registry.

transformers has no entry-point discovery for quantizers, so the plugin must register itself. To keep
``import hf_decoupleq.solver`` free of transformers, registration is deferred until transformers itself
is imported: a small meta-path finder watches for the top-level ``transformers`` import and registers
right after it. If transformers is already imported, registration happens immediately.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading

logger = logging.getLogger(__name__)

QUANT_METHOD = "decoupleq"
_lock = threading.RLock()
_registered = False


def register() -> bool:
    """Register the ``"decoupleq"`` config and quantizer with transformers (idempotent).

    Returns False when our own modules are still being imported (transformers was first imported *by*
    ``hf_decoupleq.config``); :func:`ensure_registered`, called when that import finishes, completes it.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        from transformers.quantizers import auto as hf_auto
        from transformers.quantizers import register_quantization_config, register_quantizer

        config_module = sys.modules.get("hf_decoupleq.config")
        if config_module is not None and not hasattr(config_module, "DecoupleQConfig"):
            return False  # hf_decoupleq.config is mid-import; it calls ensure_registered() at its end
        from .config import DecoupleQConfig
        from .quantizer import DecoupleQHfQuantizer

        if QUANT_METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(QUANT_METHOD)(DecoupleQConfig)
        if QUANT_METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
            register_quantizer(QUANT_METHOD)(DecoupleQHfQuantizer)
        _registered = True
        logger.debug("registered quant_method %r with transformers", QUANT_METHOD)
        return True


def ensure_registered() -> None:
    """Register now if transformers is imported and registration is still missing."""
    if not _registered and "transformers" in sys.modules:
        register()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level ``transformers`` module to call :func:`register` after it runs."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        # Find the real spec with the other finders.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            pass
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            try:
                register()
            except Exception:  # pragma: no cover - never break `import transformers`
                logger.exception("hf_decoupleq could not register with transformers")

        spec.loader.exec_module = exec_module
        return spec


def install_registration_hook() -> None:
    if "transformers" in sys.modules:
        register()
        return
    if not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())
