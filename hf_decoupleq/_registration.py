"""Registers ``"decoupleq"`` with transformers' quantizer registry.

transformers has no entry-point discovery for quantizers, so the plugin registers itself when the package is
imported. To keep ``import hf_decoupleq.solver`` free of transformers, registration waits until transformers itself
is imported: a small meta-path finder runs :func:`register` right after the top-level ``transformers`` module has
executed (at once if it already has).

Registration needs :class:`~hf_decoupleq.config.DecoupleQConfig`, whose module imports transformers. When that module
is what first imports transformers, registration cannot finish inside the transformers import (the config module is
half-initialized then); the same finder also watches ``hf_decoupleq.config`` and registers once it has executed. So
the config module stays a leaf: it knows nothing of registration, the quantizer or the pipeline.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading

logger = logging.getLogger(__name__)

QUANT_METHOD = "decoupleq"
_CONFIG_MODULE = "hf_decoupleq.config"
_WATCHED = ("transformers", _CONFIG_MODULE)
_lock = threading.RLock()
_registered = False


def register() -> bool:
    """Register the ``"decoupleq"`` config and quantizer with transformers (idempotent).

    Returns False, registering nothing, while ``hf_decoupleq.config`` is still executing (it was what imported
    transformers); the import hook calls this again when it has finished.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        config_module = sys.modules.get(_CONFIG_MODULE)
        if config_module is not None and not hasattr(config_module, "DecoupleQConfig"):
            return False
        from transformers.quantizers import auto as hf_auto
        from transformers.quantizers import register_quantization_config, register_quantizer

        from .config import DecoupleQConfig
        from .quantizer import DecoupleQHfQuantizer

        if QUANT_METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(QUANT_METHOD)(DecoupleQConfig)
        if QUANT_METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
            register_quantizer(QUANT_METHOD)(DecoupleQHfQuantizer)
        _registered = True
        logger.debug("registered quant_method %r with transformers", QUANT_METHOD)
        return True


def _register_if_ready() -> None:
    if not _registered and "transformers" in sys.modules:
        try:
            register()
        except Exception:  # pragma: no cover - never break the import that triggered it
            logger.exception("hf_decoupleq could not register with transformers")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of ``transformers`` and ``hf_decoupleq.config`` to try :func:`register` after they run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED or _registered:
            return None
        # Find the real spec with the other finders (this one steps aside while they look).
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register_if_ready()

        spec.loader.exec_module = exec_module
        return spec


def install_registration_hook() -> None:
    """Register now if transformers is already imported; otherwise right after it (or the config) is imported."""
    if "transformers" in sys.modules:
        register()
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
