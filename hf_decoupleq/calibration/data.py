"""Seeded calibration windows for the decoupleQ pipeline.

:func:`get_calibration_windows` turns a dataset spec (a known Hub dataset name, a local file, in-memory text, a
``datasets.Dataset``, already tokenized ids, or ``"self"`` for data-free sampling from the model) into a
``LongTensor [num_samples, seq_len]`` of token windows. Text is joined with ``"\\n\\n"``, tokenized once, and windows
are cut at random start positions drawn from ``torch.Generator().manual_seed(seed)`` (the GPTQ protocol), so the
same inputs and seed always give the same windows.

Local files are read directly (``open``/``json``/``pyarrow.parquet``) rather than through ``datasets.load_dataset``:
that works offline and writes nothing to the ``datasets`` cache. Named Hub datasets go through
``datasets.load_dataset`` (imported lazily, so this module stays cheap to import).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DecoupleQConfigError, DecoupleQDataError

logger = logging.getLogger(__name__)

__all__ = [
    "JSON_EXTENSIONS",
    "KNOWN_DATASETS",
    "PARQUET_EXTENSIONS",
    "SELF_DATASET",
    "SUPPORTED_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "get_calibration_windows",
    "load_texts",
    "read_text_file",
    "resolve_tokenizer",
    "sample_windows",
]

# name -> (positional args, keyword args) of datasets.load_dataset, plus whether the dataset is a large
# collection of independent documents (then only a seeded random subset of documents is tokenized, see below).
KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "wikitext2": {
        "args": ("wikitext", "wikitext-2-raw-v1"),
        "kwargs": {"split": "train"},
        "hub_id": "wikitext",
        "documents": False,
    },
    "c4": {
        "args": ("allenai/c4",),
        "kwargs": {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"},
        "hub_id": "allenai/c4",
        "documents": True,
    },
    "pile": {
        "args": ("mit-han-lab/pile-val-backup",),
        "kwargs": {"split": "validation"},
        "hub_id": "mit-han-lab/pile-val-backup",
        "documents": True,
    },
}
SELF_DATASET = "self"

TEXT_EXTENSIONS = (".txt", ".raw", ".tokens")
JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + PARQUET_EXTENSIONS

# For document collections (c4, pile: hundreds of thousands of documents) tokenizing everything once would take
# minutes for a few hundred windows. We take documents in a seeded random order until the text holds about this
# many characters per token the windows need; 16 chars/token is ~4x what English BPE text needs, so windows still
# start at well-spread positions.
_CHARS_PER_NEEDED_TOKEN = 16
_MIN_DOCUMENT_CHARS = 1 << 20
# Above this many candidate windows, starts are drawn with replacement (randint) instead of a permutation, which
# would cost 8 bytes per candidate; collisions are then vanishingly rare anyway.
_MAX_PERMUTATION = 1 << 24
_JOIN = "\n\n"


def resolve_tokenizer(tokenizer_or_name: Any) -> Any:
    """Return a tokenizer, loading it with ``AutoTokenizer.from_pretrained`` when given a name or path.

    Args:
        tokenizer_or_name (`str`, `os.PathLike` or a tokenizer):
            A Hub id or local folder to load, or an already built tokenizer (returned unchanged).

    Returns:
        The tokenizer.

    Raises:
        DecoupleQDataError: the name cannot be resolved to a tokenizer (no such repo or folder, no network, ...).
    """
    if tokenizer_or_name is None:
        raise DecoupleQDataError("tokenizer is None: pass a tokenizer object or a Hub id / local folder of one")
    if not isinstance(tokenizer_or_name, (str, os.PathLike)):
        return tokenizer_or_name
    name = os.fspath(tokenizer_or_name)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise DecoupleQDataError(
            f"could not load a tokenizer from {name!r} (not a local folder with tokenizer files, and not a "
            f"reachable Hugging Face Hub id): {exc}"
        ) from exc


def read_text_file(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """Read the documents of a local file.

    ``.txt``/``.raw``/``.tokens`` give one document, the file as-is (UTF-8). ``.jsonl`` gives field ``text_column``
    of each line; ``.json`` accepts a list of records, a ``{text_column: [...]}`` object, or JSON lines.
    ``.parquet`` gives column ``text_column``.

    Raises:
        DecoupleQDataError: the file is missing, has an unsupported extension, or lacks the column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DecoupleQDataError(
            f"unsupported data file extension {suffix or '(none)'!r} for {str(path)!r}; "
            f"allowed: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise DecoupleQDataError(f"data file not found: {str(path)!r}")
    if suffix in TEXT_EXTENSIONS:
        return [path.read_text(encoding="utf-8")]
    if suffix in PARQUET_EXTENSIONS:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_column not in names:
            raise DecoupleQDataError(f"parquet file {str(path)!r} has no column {text_column!r}; columns: {names}")
        return [t for t in pq.read_table(path, columns=[text_column]).column(text_column).to_pylist() if t]
    return _read_json_texts(path, text_column)


def _read_json_texts(path: Path, text_column: str) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    records: Any
    try:
        records = json.loads(raw)
    except json.JSONDecodeError:
        # JSON lines (also accepted under .json, as datasets' json loader does).
        records = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DecoupleQDataError(f"{str(path)!r} line {lineno} is not valid JSON: {exc}") from exc
    if isinstance(records, dict):
        if isinstance(records.get(text_column), list):
            return [t for t in records[text_column] if t]
        records = [records]
    if not isinstance(records, list):
        raise DecoupleQDataError(f"{str(path)!r} holds a JSON {type(records).__name__}; expected records")
    texts = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or text_column not in rec:
            raise DecoupleQDataError(f"record {i} of {str(path)!r} has no field {text_column!r}")
        if rec[text_column]:
            texts.append(str(rec[text_column]))
    return texts


def _looks_like_path(spec: str) -> bool:
    return (
        os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or Path(spec).suffix.lower() in SUPPORTED_EXTENSIONS
        or os.path.exists(spec)
    )


def _unknown_spec_error(spec: str) -> DecoupleQDataError:
    return DecoupleQDataError(
        f"unknown dataset {spec!r}: use one of the names {list(KNOWN_DATASETS) + [SELF_DATASET]}, a path to a "
        f"local file ({', '.join(SUPPORTED_EXTENSIONS)}), a list of strings, a datasets.Dataset, or token ids"
    )


def _dataset_column(dataset: Any, text_column: str) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict
        raise DecoupleQDataError(f"got a DatasetDict with splits {sorted(names)}; pass one split, e.g. ds['train']")
    if names is not None and text_column not in names:
        raise DecoupleQDataError(f"dataset has no column {text_column!r}; columns: {names}")
    return [t for t in dataset[text_column] if t]


def _load_named(name: str, text_column: str, budget_chars: int | None, seed: int) -> list[str]:
    import datasets

    spec = KNOWN_DATASETS[name]
    logger.info("loading calibration dataset %r via datasets.load_dataset%s", name, spec["args"])
    ds = datasets.load_dataset(*spec["args"], **spec["kwargs"])
    if not spec["documents"] or budget_chars is None:
        return _dataset_column(ds, text_column)
    names = getattr(ds, "column_names", None)
    if names is not None and text_column not in names:
        raise DecoupleQDataError(f"dataset {name!r} has no column {text_column!r}; columns: {names}")
    # Seeded random subset of documents, enough for the windows (see _CHARS_PER_NEEDED_TOKEN).
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    texts, total = [], 0
    for idx in order.tolist():
        text = ds[idx][text_column]
        if text:
            texts.append(text)
            total += len(text)
            if total >= budget_chars:
                break
    logger.info("using %d of %d documents of %r (%d characters)", len(texts), len(ds), name, total)
    return texts


def load_texts(
    dataset: Any, *, text_column: str = "text", budget_chars: int | None = None, seed: int = 0
) -> list[str]:
    """Return the documents of a text dataset spec (a known name, a local file path, strings, a ``datasets.Dataset``).

    Args:
        dataset: ``"wikitext2"``, ``"c4"``, ``"pile"``, a path to a supported file, a string list, or a Dataset.
        text_column (`str`): field/column holding the text for json/parquet files and Datasets.
        budget_chars (`int`, *optional*): for the large document collections (c4, pile), stop after a seeded random
            subset of documents holding this many characters. Ignored for other sources.
        seed (`int`): seed of that subset.

    Raises:
        DecoupleQDataError: unknown name, unsupported extension, missing file or column, or no text at all.
    """
    if isinstance(dataset, (str, os.PathLike)):
        spec = os.fspath(dataset)
        if spec in KNOWN_DATASETS and not os.path.exists(spec):
            texts = _load_named(spec, text_column, budget_chars, seed)
        elif _looks_like_path(spec):
            if os.path.isdir(spec):
                raise DecoupleQDataError(f"{spec!r} is a directory; pass a file ({', '.join(SUPPORTED_EXTENSIONS)})")
            texts = read_text_file(spec, text_column)
        else:
            raise _unknown_spec_error(spec)
    elif isinstance(dataset, Sequence) and all(isinstance(t, str) for t in dataset):
        texts = [t for t in dataset if t]
    elif hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):
        texts = _dataset_column(dataset, text_column)
    else:
        raise DecoupleQDataError(
            f"unsupported dataset type {type(dataset).__name__}: use a known name, a file path, a list of strings, "
            "a datasets.Dataset or token ids"
        )
    if not texts or not any(t.strip() for t in texts):
        raise DecoupleQDataError(f"dataset {_describe(dataset)} is empty: it holds no text")
    return texts


def _describe(dataset: Any) -> str:
    if isinstance(dataset, (str, os.PathLike)):
        return repr(os.fspath(dataset))
    return f"of type {type(dataset).__name__}"


def _as_token_rows(dataset: Any, text_column: str = "text") -> list[torch.Tensor] | None:
    """Token ids given directly -> list of 1-D int64 rows; None when ``dataset`` is not token ids."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list) and "input_ids" in names and text_column not in names:
        # A tokenized datasets.Dataset (e.g. the output of ds.map(tokenizer)).
        return [torch.as_tensor(r, dtype=torch.long) for r in dataset["input_ids"]]
    if (
        isinstance(dataset, (list, tuple))
        and dataset
        and all(isinstance(r, (list, tuple)) and r and all(isinstance(t, int) for t in r) for r in dataset)
    ):
        return [torch.tensor(r, dtype=torch.long) for r in dataset]
    if isinstance(dataset, Mapping) or (hasattr(dataset, "input_ids") and not hasattr(dataset, "column_names")):
        ids = dataset.get("input_ids") if isinstance(dataset, Mapping) else dataset.input_ids
        if ids is None:
            raise DecoupleQDataError("the mapping given as dataset has no 'input_ids'")
        rows = _as_token_rows(ids if isinstance(ids, torch.Tensor) else [torch.as_tensor(r) for r in ids])
        if rows is None:
            raise DecoupleQDataError("'input_ids' must be a LongTensor [n, L] or a list of 1-D id tensors")
        return rows
    if isinstance(dataset, torch.Tensor):
        if dataset.is_floating_point() or dataset.is_complex() or dataset.dtype == torch.bool:
            raise DecoupleQDataError(f"token ids must be an integer tensor, got dtype {dataset.dtype}")
        if dataset.dim() == 1:
            dataset = dataset.unsqueeze(0)
        if dataset.dim() != 2:
            raise DecoupleQDataError(f"token ids must be [n, L] or [L], got shape {tuple(dataset.shape)}")
        return [row.long().cpu() for row in dataset]
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, torch.Tensor) for r in dataset):
        rows = []
        for i, r in enumerate(dataset):
            if r.is_floating_point() or r.dim() != 1:
                raise DecoupleQDataError(
                    f"token row {i} must be a 1-D integer tensor, got dtype {r.dtype} shape {tuple(r.shape)}"
                )
            rows.append(r.long().cpu())
        return rows
    return None


def sample_windows(
    rows: Sequence[torch.Tensor], num_samples: int, seq_len: int, seed: int, *, allow_repeats: bool = True
) -> torch.Tensor:
    """Cut ``num_samples`` windows of ``seq_len`` tokens at seeded random positions.

    When every row holds at least ``seq_len`` tokens, windows never cross a row boundary and are drawn uniformly over
    all ``(row, start)`` candidates; otherwise the rows are concatenated first. Distinct candidates are drawn
    (a seeded permutation) when there are enough of them, so e.g. ``[n, seq_len]`` input with ``num_samples = n``
    returns each row once; with fewer candidates than ``num_samples`` they repeat, with a warning, or
    (``allow_repeats=False``) the call fails.

    Returns:
        `torch.LongTensor` of shape ``[num_samples, seq_len]``.

    Raises:
        DecoupleQDataError: no tokens, fewer tokens than one window, or (``allow_repeats=False``) fewer distinct
            windows than ``num_samples``.
    """
    rows = [r for r in rows if r.numel() > 0]
    n_tokens = sum(r.numel() for r in rows)
    if n_tokens == 0:
        raise DecoupleQDataError("dataset is empty: it holds no tokens")
    if any(r.numel() < seq_len for r in rows):
        rows = [torch.cat(rows)] if len(rows) > 1 else rows
    if rows[0].numel() < seq_len:
        raise DecoupleQDataError(
            f"dataset has {n_tokens} tokens, fewer than one window: seq_len={seq_len} needs at least {seq_len}"
        )
    counts = torch.tensor([r.numel() - seq_len + 1 for r in rows], dtype=torch.long)
    total = int(counts.sum())
    if total < num_samples and not allow_repeats:
        raise DecoupleQDataError(
            f"the data holds {total} distinct windows of {seq_len} tokens, fewer than num_samples={num_samples}"
        )
    gen = torch.Generator().manual_seed(seed)
    if num_samples <= total <= _MAX_PERMUTATION:
        picks = torch.randperm(total, generator=gen)[:num_samples]
    else:
        if total < num_samples:
            logger.warning(
                "only %d distinct windows of %d tokens exist for num_samples=%d: windows repeat",
                total,
                seq_len,
                num_samples,
            )
        picks = torch.randint(0, total, (num_samples,), generator=gen)
    # Map flat candidate index -> (row, start).
    ends = counts.cumsum(0)
    row_idx = torch.searchsorted(ends, picks, right=True)
    starts = picks - (ends - counts)[row_idx]
    out = torch.empty(num_samples, seq_len, dtype=torch.long)
    for i, (r, s) in enumerate(zip(row_idx.tolist(), starts.tolist(), strict=True)):
        out[i] = rows[r][s : s + seq_len]
    return out


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Join documents with ``"\\n\\n"`` and tokenize once (special tokens as the tokenizer adds them). 1-D int64."""
    enc = tokenizer(_JOIN.join(texts), return_tensors="pt", verbose=False)
    return enc["input_ids"][0].long()


def _model_device(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


# Self-sampling batches: at most this many sequences, and KV caches of at most this many bytes in all.
_MAX_GENERATION_BATCH = 32
_GENERATION_CACHE_BYTES = 4 << 30


def _generation_batch_size(model: torch.nn.Module, num_samples: int, seq_len: int) -> int:
    """Sequences sampled together for ``"self"``: up to 32 whose KV cache (``seq_len`` tokens, from the model config
    and dtype) fits in 4 GiB. It depends on the model and the settings only, so the windows do not change with the
    machine."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    layers = getattr(cfg, "num_hidden_layers", None) or 32
    heads = getattr(cfg, "num_attention_heads", None) or 32
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or 4096) // heads
    element = next(model.parameters()).element_size()
    per_sequence = 2 * layers * kv_heads * head_dim * element * seq_len
    return max(1, min(_MAX_GENERATION_BATCH, num_samples, _GENERATION_CACHE_BYTES // max(per_sequence, 1)))


def _cache_argument(model: torch.nn.Module) -> str:
    """The name under which `model`'s forward takes (and its output returns) the KV cache: ``cache`` from transformers
    5.24 on (``past_key_values`` is deprecated there and warns on every call), ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins / C extensions
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def _sample_from_model(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    top_k: int,
    temperature: float,
) -> torch.Tensor:
    device = _model_device(model)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else None
    vocab = vocab or int(model.config.vocab_size)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    cache_arg = _cache_argument(model)
    # The generator lives on the model's device so multinomial sampling stays there; seeding makes it reproducible.
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(num_samples, seq_len, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, num_samples, batch_size):
            b = min(batch_size, num_samples - lo)
            if bos is not None:
                ids = torch.full((b, 1), int(bos), dtype=torch.long, device=device)
            else:
                ids = torch.randint(0, vocab, (b, 1), generator=gen, device=device)
            seqs = [ids]
            cur, past = ids, None
            for _ in range(seq_len - 1):
                res = model(input_ids=cur, use_cache=True, **{cache_arg: past})
                past = getattr(res, cache_arg)
                logits = res.logits[:, -1, :].float() / temperature
                if 0 < top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                cur = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
                seqs.append(cur)
            out[lo : lo + b] = torch.cat(seqs, dim=1).cpu()
            logger.info("sampled %d/%d self-calibration sequences", lo + b, num_samples)
    finally:
        model.train(was_training)
    return out


def get_calibration_windows(
    dataset: Any,
    tokenizer: Any = None,
    *,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    model: torch.nn.Module | None = None,
    text_column: str = "text",
    generation_batch_size: int | None = None,
    top_k: int = 50,
    temperature: float = 1.0,
    allow_repeats: bool = True,
) -> torch.Tensor:
    """Build ``num_samples`` calibration windows of ``seq_len`` tokens, reproducibly.

    Args:
        dataset:
            One of:

            - a known name: ``"wikitext2"`` (Hub ``wikitext``, ``wikitext-2-raw-v1``, train), ``"c4"`` (``allenai/c4``,
              ``en/c4-train.00000-of-01024.json.gz``, train) or ``"pile"`` (``mit-han-lab/pile-val-backup``,
              validation), loaded with ``datasets.load_dataset``. For c4 and pile only a seeded random subset of
              documents (about 16 characters per token needed) is tokenized, since tokenizing the whole shard
              would take minutes;
            - a local file: ``.txt``/``.raw``/``.tokens`` (plain text), ``.jsonl``/``.json`` (field ``text_column``),
              ``.parquet`` (column ``text_column``), read directly (offline, nothing written to a cache);
            - a list of strings, or a ``datasets.Dataset`` (column ``text_column``);
            - token ids: a LongTensor ``[n, L]`` (or ``[L]``), a list of 1-D LongTensors or of int lists, a
              dict/BatchEncoding with ``input_ids``, or a Dataset with an ``input_ids`` column and no ``text_column``;
            - ``"self"``: data-free calibration as in LLM-QAT. Each sequence starts from the tokenizer's BOS token
              (or the model config's, or a seeded random token when there is none) and is sampled from ``model``
              itself (temperature ``temperature``, top-``top_k``, KV cache, ``generation_batch_size`` sequences at a
              time, seeded ``torch.Generator`` on the model's device). A decode step costs about the same for 4 or
              32 sequences on a CPU, so by default as many sequences as possible are sampled together: up to 32,
              as many as keep their KV cache under 4 GiB (from the model config, so the same on every machine). Trade-off: no data is needed, but it is much
              slower (``seq_len`` forward passes per batch) and the windows follow the model's own distribution,
              which may under-represent domain text the model will see in use.

            Text is joined with ``"\\n\\n"`` and tokenized once; windows start at seeded random positions.
        tokenizer: a tokenizer or a Hub id / local folder (see :func:`resolve_tokenizer`). Required for text; when it
            is None and ``model`` has a ``name_or_path``, the tokenizer is loaded from there.
        num_samples (`int`): number of windows.
        seq_len (`int`): tokens per window.
        seed (`int`): seed of the window positions (and of sampling for ``"self"``).
        model: the model to sample from for ``"self"``; otherwise only used to find a tokenizer.
        text_column (`str`): text field of json/parquet files and Datasets.
        generation_batch_size, top_k, temperature: sampling settings for ``"self"`` (``generation_batch_size=None``:
            see ``"self"`` above).
        allow_repeats (`bool`): when the data holds fewer distinct windows than ``num_samples``, repeat windows
            (with a warning; the default) or fail. (``"self"`` samples as many sequences as asked.)

    Returns:
        `torch.LongTensor` of shape ``[num_samples, seq_len]`` on the CPU.

    Raises:
        DecoupleQConfigError: ``num_samples``, ``seq_len`` or a sampling setting is not positive.
        DecoupleQDataError: empty data, fewer tokens than one window, missing file, unknown name or extension,
            text without a tokenizer, a tokenizer name that cannot be loaded, or (``allow_repeats=False``) fewer
            distinct windows than ``num_samples``.
    """
    for field, value in (("num_samples", num_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DecoupleQConfigError(f"{field} must be a positive int, got {value!r}")

    if isinstance(dataset, str) and dataset == SELF_DATASET:
        if model is None:
            raise DecoupleQDataError("dataset='self' samples calibration text from the model: pass model=...")
        if generation_batch_size is None:
            generation_batch_size = _generation_batch_size(model, num_samples, seq_len)
        if generation_batch_size < 1 or top_k < 0 or not temperature > 0:
            raise DecoupleQConfigError(
                f"self-sampling needs generation_batch_size >= 1, top_k >= 0 and temperature > 0; got "
                f"{generation_batch_size!r}, {top_k!r}, {temperature!r}"
            )
        tok = resolve_tokenizer(tokenizer) if tokenizer is not None else None
        return _sample_from_model(
            model,
            tok,
            num_samples=num_samples,
            seq_len=seq_len,
            seed=seed,
            batch_size=generation_batch_size,
            top_k=top_k,
            temperature=temperature,
        )

    if isinstance(dataset, (list, tuple)) and len(dataset) == 0:
        raise DecoupleQDataError("dataset is empty: got an empty list")
    rows = _as_token_rows(dataset, text_column)
    if rows is None:
        if tokenizer is None and model is not None and getattr(model, "name_or_path", None):
            tokenizer = model.name_or_path
        if tokenizer is None:
            # Validate the spec first so an unknown name or missing file is reported as such.
            if isinstance(dataset, (str, os.PathLike)) and os.fspath(dataset) not in KNOWN_DATASETS:
                spec = os.fspath(dataset)
                if not _looks_like_path(spec):
                    raise _unknown_spec_error(spec)
                if not os.path.isfile(spec):
                    raise DecoupleQDataError(f"data file not found: {spec!r}")
            raise DecoupleQDataError(
                f"dataset {_describe(dataset)} is text and needs a tokenizer: pass tokenizer= (an object or a "
                "Hub id / folder)"
            )
        tok = resolve_tokenizer(tokenizer)
        budget = max(_MIN_DOCUMENT_CHARS, num_samples * seq_len * _CHARS_PER_NEEDED_TOKEN)
        texts = load_texts(dataset, text_column=text_column, budget_chars=budget, seed=seed)
        rows = [tokenize_texts(texts, tok)]
    windows = sample_windows(rows, num_samples, seq_len, seed, allow_repeats=allow_repeats)
    logger.info("calibration: %d windows of %d tokens (seed %d)", num_samples, seq_len, seed)
    return windows
