"""Calibration: seeded token windows (``data``); input capture and Hessian accumulation live beside it."""

from .data import get_calibration_windows, resolve_tokenizer

__all__ = ["get_calibration_windows", "resolve_tokenizer"]
