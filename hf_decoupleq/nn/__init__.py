"""Torch modules holding decoupleQ packed weights."""

from .linear import DecoupleQLinear

__all__ = ["DecoupleQLinear"]
