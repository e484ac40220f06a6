"""Export of decoupleQ checkpoints to other runtimes' formats (GGUF for llama.cpp / Ollama)."""

from .gguf import ARCHITECTURES, GGUF_TYPES, GGUFExportReport, TensorRecord, export_gguf

__all__ = ["ARCHITECTURES", "GGUF_TYPES", "GGUFExportReport", "TensorRecord", "export_gguf"]
