"""Exceptions raised by hf-decoupleq. Pure Python: importable from the solver without transformers."""


class DecoupleQError(Exception):
    """Base class of every error hf-decoupleq raises on purpose."""


class DecoupleQConfigError(DecoupleQError, ValueError):
    """A configuration value is not allowed; the message names the field, the value and what is allowed."""


class DecoupleQNumericalError(DecoupleQError, ArithmeticError):
    """Numerical trouble the solver cannot recover from (non-finite data, a Hessian that stays singular)."""


class DecoupleQDataError(DecoupleQError, ValueError):
    """Calibration or evaluation data that cannot be used (missing file, too few tokens, ...)."""


class DecoupleQCheckpointError(DecoupleQError, ValueError):
    """A packed checkpoint or a resume directory that disagrees with the configuration."""


class UnsupportedModelError(DecoupleQError, ValueError):
    """The model has no decoder blocks or linear layers this library knows how to quantize."""
