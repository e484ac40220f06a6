"""Perplexity with the standard GPTQ/decoupleQ protocol.

The evaluation text is tokenized once; non-overlapping windows of ``seq_len`` tokens are cut from the start (the
trailing partial window is dropped); each window is scored independently (no context carried over), and the result is
the exponential of the mean next-token negative log-likelihood over all predicted tokens (``seq_len - 1`` per window).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .calibration.data import (
    KNOWN_DATASETS,
    SUPPORTED_EXTENSIONS,
    _looks_like_path,
    read_text_file,
    resolve_tokenizer,
)
from .errors import DecoupleQConfigError, DecoupleQDataError

logger = logging.getLogger(__name__)

__all__ = ["EVAL_DATASETS", "PerplexityResult", "load_eval_text", "perplexity", "perplexity_record"]

# Known evaluation sets: name -> datasets.load_dataset arguments (the test split, as every paper reports).
EVAL_DATASETS: dict[str, dict[str, Any]] = {
    "wikitext2": {"args": ("wikitext", "wikitext-2-raw-v1"), "kwargs": {"split": "test"}},
}
_JOIN = "\n\n"
# A str argument longer than this, or containing a newline, is taken as the evaluation text itself, not a path.
_MAX_PATH_LEN = 4096


@dataclass(frozen=True)
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes:
        ppl (`float`): ``exp(nll)``.
        nll (`float`): mean next-token negative log-likelihood (nats) over all predicted tokens.
        n_tokens (`int`): number of predicted tokens (``n_windows * (seq_len - 1)``).
        n_windows (`int`): number of windows scored.
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int


def load_eval_text(dataset: Any, *, text_column: str = "text") -> str:
    """Return the evaluation text.

    Args:
        dataset: a path (``.txt``/``.raw``/``.tokens`` read as-is; ``.jsonl``/``.json``/``.parquet`` records joined
            with ``"\\n\\n"``), a known name (``"wikitext2"``: the test split of Hub ``wikitext``/``wikitext-2-raw-v1``
            via ``datasets``, rows joined with ``"\\n\\n"``), or a list of strings or a ``datasets.Dataset`` split
            (column ``text_column``), joined with ``"\\n\\n"``.
        text_column (`str`): text field of json/parquet files.

    Raises:
        DecoupleQDataError: unknown name, unsupported extension, missing file, or no text.
    """
    if isinstance(dataset, (str, os.PathLike)):
        spec = os.fspath(dataset)
        if spec in EVAL_DATASETS and not os.path.exists(spec):
            import datasets

            cfg = EVAL_DATASETS[spec]
            logger.info("loading evaluation dataset %r via datasets.load_dataset%s", spec, cfg["args"])
            ds = datasets.load_dataset(*cfg["args"], **cfg["kwargs"])
            text = _JOIN.join(ds[text_column])
        elif _looks_like_path(spec):
            text = _JOIN.join(read_text_file(spec, text_column))
        else:
            hint = " (a calibration set; evaluate on 'wikitext2')" if spec in KNOWN_DATASETS else ""
            raise DecoupleQDataError(
                f"unknown evaluation dataset {spec!r}{hint}: use one of {sorted(EVAL_DATASETS)}, a path to a local "
                f"file ({', '.join(SUPPORTED_EXTENSIONS)}), a list of strings or a datasets.Dataset"
            )
    elif isinstance(dataset, Sequence) and all(isinstance(t, str) for t in dataset):
        text = _JOIN.join(dataset)
    elif isinstance(getattr(dataset, "column_names", None), list):  # a datasets.Dataset split
        if text_column not in dataset.column_names:
            raise DecoupleQDataError(f"dataset has no column {text_column!r}; columns: {dataset.column_names}")
        text = _JOIN.join(dataset[text_column])
    else:
        raise DecoupleQDataError(
            f"unsupported evaluation data of type {type(dataset).__name__}: use a known name, a path or a list of "
            "strings"
        )
    if not text.strip():
        raise DecoupleQDataError(f"evaluation data {dataset!r:.200} holds no text")
    return text


def _input_ids(tokenizer: Any, text_or_dataset: Any) -> torch.Tensor:
    """Resolve the argument of :func:`perplexity` to a 1-D LongTensor of token ids."""
    if isinstance(text_or_dataset, torch.Tensor):
        if text_or_dataset.is_floating_point() or text_or_dataset.dim() > 2:
            raise DecoupleQDataError(
                f"token ids must be an integer tensor [L] or [1, L], got {text_or_dataset.dtype} "
                f"{tuple(text_or_dataset.shape)}"
            )
        return text_or_dataset.reshape(-1).long()
    if isinstance(text_or_dataset, str) and (len(text_or_dataset) > _MAX_PATH_LEN or "\n" in text_or_dataset):
        text = text_or_dataset
    elif isinstance(text_or_dataset, str) and not (
        text_or_dataset in EVAL_DATASETS or _looks_like_path(text_or_dataset)
    ):
        # A short string that is neither a known name nor path-like: the evaluation text itself.
        text = text_or_dataset
    else:
        text = load_eval_text(text_or_dataset)
    if tokenizer is None:
        raise DecoupleQDataError("perplexity on text needs a tokenizer")
    tokenizer = resolve_tokenizer(tokenizer)
    return tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0].long()


def _input_device(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(model.parameters()).device


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text_or_dataset: Any,
    *,
    seq_len: int = 2048,
    max_windows: int | None = 40,
    batch_size: int = 1,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on a text, with non-overlapping windows (the GPTQ / decoupleQ protocol).

    Args:
        model: a causal LM returning ``.logits`` ``[batch, seq, vocab]``. Put in eval mode for the call (its
            training flag is restored afterwards); not moved.
        tokenizer: tokenizer (or Hub id / folder) used to tokenize the whole text once. May be None for token ids.
        text_or_dataset: the text itself, a path or known name (see :func:`load_eval_text`), a list of strings, a
            ``datasets.Dataset`` (column ``"text"``), or token ids (LongTensor ``[L]`` or ``[1, L]``).
        seq_len (`int`): window length.
        max_windows (`int`, *optional*): score only the first windows (default 40, the benchmark protocol);
            None scores all of them.
        batch_size (`int`): windows per forward pass.
        progress (`bool`): show a tqdm progress bar over windows.
        device: where to put the inputs; defaults to the device of the input embeddings.

    Returns:
        :class:`PerplexityResult` with ``ppl = exp(nll)``, ``nll`` the mean next-token NLL over all predicted tokens.

    Raises:
        DecoupleQConfigError: ``seq_len < 2``, ``batch_size < 1`` or ``max_windows < 1``.
        DecoupleQDataError: the text has fewer than ``seq_len`` tokens, or cannot be loaded.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DecoupleQConfigError(f"seq_len must be an int >= 2 (one token predicted needs two), got {seq_len!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DecoupleQConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise DecoupleQConfigError(f"max_windows must be a positive int or None, got {max_windows!r}")

    ids = _input_ids(tokenizer, text_or_dataset)
    n_avail = ids.numel() // seq_len
    if n_avail == 0:
        raise DecoupleQDataError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    n_windows = n_avail if max_windows is None else min(n_avail, max_windows)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = torch.device(device) if device is not None else _input_device(model)

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    try:
        with torch.inference_mode(), tqdm(total=n_windows, desc="perplexity", unit="win", disable=not progress) as bar:
            for lo in range(0, n_windows, batch_size):
                batch = windows[lo : lo + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # Sum of -log p(x_t | x_<t) over the batch, accumulated in float64 so 80k terms lose nothing.
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    batch[:, 1:].reshape(-1),
                    reduction="sum",
                )
                if not torch.isfinite(nll):
                    logger.warning("non-finite NLL in windows %d-%d", lo, lo + batch.shape[0] - 1)
                total_nll += nll.double().cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    n_tokens = n_windows * (seq_len - 1)
    mean_nll = float(total_nll) / n_tokens
    # exp overflows float64 past ~709; report inf there, and keep NaN visible as NaN.
    ppl = mean_nll if math.isnan(mean_nll) else math.exp(mean_nll) if mean_nll < 700 else float("inf")
    logger.info(
        "perplexity %.4f (nll %.5f over %d tokens, %d windows of %d)", ppl, mean_nll, n_tokens, n_windows, seq_len
    )
    return PerplexityResult(ppl=ppl, nll=mean_nll, n_tokens=n_tokens, n_windows=n_windows)


def perplexity_record(
    quantized: PerplexityResult,
    original: PerplexityResult | None,
    *,
    dataset: str,
    seq_len: int,
    command: str | None = None,
) -> dict[str, Any]:
    """A JSON-safe record of a measured perplexity, with its protocol, for the model card.

    Stored as ``quantization_stats["eval"]["perplexity"]`` it is written to ``config.json`` and rendered as the card's
    "Quality" section (:func:`hf_decoupleq.hub.card.render_model_card`).

    Args:
        quantized: the quantized model's result.
        original: the full-precision model's result on the very same windows, or None if it was not measured.
        dataset: what was scored, as a reader should see it (a dataset name or a file name, never a local path).
        seq_len: the window length used.
        command: the command that measured it, if any.

    Raises:
        DecoupleQConfigError: the two results were not measured on the same windows.
    """
    if original is not None and (original.n_windows, original.n_tokens) != (quantized.n_windows, quantized.n_tokens):
        raise DecoupleQConfigError(
            f"the original ({original.n_windows} windows, {original.n_tokens} tokens) and quantized "
            f"({quantized.n_windows} windows, {quantized.n_tokens} tokens) perplexities were measured on different text"
        )
    record: dict[str, Any] = {
        "metric": "perplexity",
        "dataset": dataset,
        "protocol": (
            f"{quantized.n_windows} non-overlapping windows of {seq_len} tokens from the start of the text, each "
            f"scored on its own; exp of the mean next-token negative log-likelihood over {quantized.n_tokens} "
            "predicted tokens"
        ),
        "seq_len": seq_len,
        "n_windows": quantized.n_windows,
        "n_tokens": quantized.n_tokens,
        "quantized": quantized.ppl,
        "original": None if original is None else original.ppl,
    }
    if command:
        record["command"] = command
    return record
