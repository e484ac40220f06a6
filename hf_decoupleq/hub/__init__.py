"""Hub helpers: model cards for decoupleQ checkpoints (uploads stay transformers' ``push_to_hub``)."""

from .card import render_model_card

__all__ = ["render_model_card"]
