"""The ``decoupleq`` command line: quantize a model, then evaluate or sample from the result.

::

    decoupleq quantize MODEL --bits 2 --group-size 64 --dataset wikitext2|PATH|self --output DIR [--push-to-hub REPO]
    decoupleq eval DIR --dataset PATH [--seq-len 2048] [--max-windows 40]
    decoupleq generate DIR --prompt "..." [--max-new-tokens 50]
    decoupleq export DIR --format gguf[:TYPE] --output model.gguf [--allow-lossy]

``MODEL`` is a Hub id, a local checkpoint folder, or a ``.gguf`` file. Every field of `DecoupleQConfig` has a flag
(built from its signature, so a new field gets one without touching this file). This module is the only place that
parses arguments and configures logging; the library below only ever sees a `DecoupleQConfig`.

Exit codes: 0 on success, 2 for usage errors (bad flags or config values, missing files, an existing output folder
without ``--overwrite``, unusable data), 1 for any other failure. Errors are one line on stderr
(``decoupleq: error: ...``); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "decoupleq"
# Config fields the library writes itself; they describe a result, so a user never sets them.
NOT_FLAGS = {
    "format_version": "written by the library: the packed format this version produces",
    "quantization_stats": "written by the library after quantizing",
    "packed_modules": "written by the library: the modules stored packed",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Files that mark a folder as holding a saved model (refused as --output without --overwrite).
MODEL_MARKERS = ("config.json", "*.safetensors")

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A command-line mistake found before any work is done (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors raised as `UsageError`, so `main` reports every usage error the same way."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------------


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _field_help() -> dict[str, str]:
    """Each field's description from the `DecoupleQConfig` docstring (its HF-style ``Args:`` section)."""
    import re

    from .config import DecoupleQConfig

    doc = inspect.getdoc(DecoupleQConfig) or ""
    args = doc.split("Args:", 1)[-1]
    helps: dict[str, str] = {}
    carry = ""
    # Entries start with "name (`type`, ...)"; several names may share one description ("a (...), b (...): text").
    for entry in re.split(r"\n(?=    \w+ \()", "\n" + args):
        head, sep, text = (carry + entry).partition("): ")
        if not sep:
            carry += entry
            continue
        carry = ""
        text = " ".join(text.split())
        for name in re.findall(r"(\w+) \(", head):
            helps[name] = text
    return helps


def _int_or_auto(text: str) -> int | str:
    """argparse type of the fields that take a number or "auto" (e.g. ``--batch-size``)."""
    if text.lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use an integer or 'auto'") from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.rpartition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use KEY=VALUE")
    return key, value


class _DictAction(argparse.Action):
    """``--flag K1=V1 K2=V2`` -> ``{K1: V1, K2: V2}`` (the key may itself contain ``=``; the last one splits)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, dict(values))


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `DecoupleQConfig` field, typed from the field's default and annotation.

    Defaults are suppressed, so only the flags given on the command line reach `DecoupleQConfig(...)` and the rest keep
    the library's defaults (one source of truth, which also validates; the help text shows the defaults).
    """
    from .config import DecoupleQConfig

    group = parser.add_argument_group("quantization settings (the fields of DecoupleQConfig)")
    params = inspect.signature(DecoupleQConfig.__init__).parameters
    helps = _field_help()
    for field in DecoupleQConfig._field_names():
        if field in NOT_FLAGS:
            continue
        default = params[field].default
        annotation = str(params[field].annotation)
        text = helps.get(field, "").replace("%", "%%")
        if "default" not in text:
            text = f"{text} (default: {default})".strip()
        kwargs: dict[str, Any] = {"dest": f"cfg_{field}", "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            kwargs.update(action=argparse.BooleanOptionalAction, help=text)
        elif default is None and annotation.startswith("list"):
            kwargs.update(nargs="*", metavar="NAME", help=f"{text} Give the flag alone to convert every module.")
        elif annotation.startswith("dict"):
            kwargs.update(nargs="+", type=_key_value, action=_DictAction, metavar="KEY=VALUE", help=text)
        else:
            # bool is handled above; int/float defaults give their type, everything else is a string.
            if isinstance(default, (int, float)):
                kind = type(default)
            elif default == "auto" and annotation.startswith("int"):  # "int | str": a number or "auto"
                kind = _int_or_auto
            else:  # an optional number ("float | None") keeps its number type
                kind = float if annotation.startswith("float") else int if annotation.startswith("int") else str
            metavar = {int: "N", float: "X", _int_or_auto: "N|auto"}.get(kind, "VALUE")
            kwargs.update(type=kind, metavar=metavar, help=text)
        group.add_argument(_flag(field), **kwargs)


def _common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS lets these options appear both before and after the command without one overwriting the other.
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="level of hf_decoupleq's log (default: info)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-v: debug, -vv: also transformers' debug log)",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")


def _load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the weights in (default: auto)")


# The MODEL argument of the commands that run a model (metavar, help).
_ANY_MODEL = ("DIR", "a saved (quantized or not) model folder, a Hub id, or a .gguf file")


def _command(sub: Any, name: str, help: str, description: str, *, model: tuple[str, str]) -> argparse.ArgumentParser:
    """A sub-command whose first argument is the model (`model`: its metavar and help)."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("model", metavar=model[0], help=model[1])
    return parser


def _run_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run a model: device, tokenizer, load dtype, and the common ones."""
    parser.add_argument("--device", help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--tokenizer", help="tokenizer Hub id or folder (default: the model's)")
    _load_options(parser)
    _common_options(parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``decoupleq`` argument parser (commands ``quantize``, ``eval``, ``generate``, ``export``)."""
    parser = _Parser(prog=PROG, description="decoupleQ 2/3/4-bit weight quantization for Hugging Face transformers.")
    _common_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    q = _command(
        sub,
        "quantize",
        "quantize a model and save it (packed weights, tokenizer, model card)",
        "Quantize MODEL with decoupleQ and save it to --output: packed safetensors, config.json, the "
        "tokenizer and a README.md model card. Reload it with `import hf_decoupleq` and "
        "AutoModelForCausalLM.from_pretrained(DIR).",
        model=("MODEL", "a Hub id, a local checkpoint folder, or a .gguf file"),
    )
    q.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the quantized model to")
    q.add_argument("--overwrite", action="store_true", help="write into --output even if it already holds a model")
    q.add_argument("--push-to-hub", metavar="REPO", help="also upload the output folder to this Hub repo")
    q.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    q.add_argument(
        "--eval-dataset",
        metavar="NAME|PATH",
        help="also measure the perplexity of the original and the quantized model on this text ('wikitext2': the Hub "
        "test split, or a local text file) and write both, with the protocol, into the model card",
    )
    q.add_argument("--eval-seq-len", type=int, default=2048, help="window length of --eval-dataset (default: 2048)")
    q.add_argument("--eval-windows", type=int, default=40, help="windows of --eval-dataset to score (default: 40)")
    _load_options(q)
    _add_config_flags(q)
    _common_options(q)

    e = _command(
        sub, "eval", "perplexity of a model on a text", "Perplexity with non-overlapping windows.", model=_ANY_MODEL
    )
    e.add_argument("--dataset", required=True, help="'wikitext2' (the Hub test split) or a local text file")
    e.add_argument("--seq-len", type=int, default=2048, help="window length in tokens (default: 2048)")
    e.add_argument("--max-windows", type=int, default=40, help="score the first N windows (default: 40; 0: all)")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    _run_options(e)

    g = _command(sub, "generate", "greedy continuation of a prompt", "Print a greedy continuation.", model=_ANY_MODEL)
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default: 50)")
    _run_options(g)

    x = _command(
        sub,
        "export",
        "write a decoupleQ checkpoint as a GGUF file for llama.cpp / Ollama",
        "Write the checkpoint DIR as a GGUF file. W4 (and W2/W3) checkpoints without incoherence and with "
        "group sizes that are multiples of 32 map exactly to Q4_1 (symmetric ones also to Q4_0); checkpoints "
        "quantized with --gguf-type (and --gguf-layer-types) map exactly to those types; any other type needs "
        "--allow-lossy, which requantizes the dequantized weights and reports the error it adds.",
        model=("DIR", "a saved decoupleQ checkpoint folder (with its tokenizer)"),
    )
    x.add_argument(
        "--format",
        required=True,
        metavar="gguf[:TYPE]",
        help="gguf, or gguf:TYPE with TYPE one of q4_0, q4_1, q8_0, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k "
        "(default: the type that holds the checkpoint exactly)",
    )
    x.add_argument("-o", "--output", required=True, metavar="FILE", help="the .gguf file to write")
    x.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    x.add_argument(
        "--allow-lossy", action="store_true", help="requantize layers the type cannot hold exactly (adds error)"
    )
    x.add_argument("--embedding-type", default="f16", help="type of token_embd.weight (default: f16)")
    x.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name (default: recognized from tokenizer.json)")
    _common_options(x)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf")


def _check_model_spec(spec: str) -> None:
    """Reject a MODEL that is clearly meant as a local path but does not exist (a Hub id is left to transformers)."""
    if os.path.exists(spec):
        if _is_gguf(spec) and not os.path.isfile(spec):
            raise UsageError(f"GGUF model {spec!r} is not a file")
        return
    if _is_gguf(spec):
        raise UsageError(f"GGUF file not found: {spec!r}")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec):
        # Hub ids are "name" or "org/name"; anything else with a path shape must exist locally.
        raise UsageError(f"model folder not found: {spec!r} (use a Hub id, a local checkpoint folder or a .gguf file)")


def _check_dataset(dataset: str, known: Sequence[str]) -> None:
    """A known dataset name, or an existing file of a kind the library reads."""
    from .calibration.data import SUPPORTED_EXTENSIONS

    if dataset in known:
        return
    kinds = "/".join(SUPPORTED_EXTENSIONS)
    if not os.path.exists(dataset):
        raise UsageError(f"dataset file not found: {dataset!r} (use one of {list(known)} or a path to a {kinds} file)")
    if os.path.isdir(dataset):
        raise UsageError(f"dataset {dataset!r} is a folder; pass a {kinds} file")
    if Path(dataset).suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise UsageError(f"dataset {dataset!r} is not a {kinds} file")


def _check_device(device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device: use e.g. cpu, cuda, cuda:1, mps") from None


def _check_output(output: str, overwrite: bool) -> None:
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {output!r} exists and is not a folder")
    if path.is_dir() and not overwrite and any(any(path.glob(pattern)) for pattern in MODEL_MARKERS):
        raise UsageError(f"--output {output!r} already holds a model (config.json / *.safetensors); pass --overwrite")


def _load_tokenizer(spec: str, tokenizer: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    if _is_gguf(spec):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(spec)), gguf_file=os.path.basename(spec))
    return AutoTokenizer.from_pretrained(spec)


def _load_model(spec: str, dtype: str, **kwargs: Any) -> Any:
    """Load a causal LM from a Hub id, a folder or a ``.gguf`` file (dequantized to full precision)."""
    from transformers import AutoModelForCausalLM

    import hf_decoupleq  # noqa: F401  (registers "decoupleq" so saved decoupleQ checkpoints load packed)

    if _is_gguf(spec):
        folder, name = os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=_torch_dtype(dtype), **kwargs)
    return AutoModelForCausalLM.from_pretrained(spec, dtype=_torch_dtype(dtype), **kwargs)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> Any:
    """The `DecoupleQConfig` of parsed ``quantize`` arguments: the flags given, library defaults for the rest."""
    from .config import DecoupleQConfig

    fields = {k[len("cfg_") :]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    return DecoupleQConfig(**fields)


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None) -> Any:
    """Upload every file of a saved model folder (weights, config, tokenizer, card) to `repo_id` in one commit.

    The token comes from the environment or `hf auth login`, never from the command line. Returns the `CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message="Upload decoupleQ-quantized model")


def cmd_quantize(args: argparse.Namespace) -> int:
    """``decoupleq quantize``: load MODEL, quantize it, save model + tokenizer + card to --output (and push)."""
    from .config import KNOWN_DATASETS

    # Every check that needs no model comes first, so a mistake costs nothing.
    config = config_from_args(args)
    _check_model_spec(args.model)
    _check_device(config.device)
    if isinstance(config.dataset, str):
        _check_dataset(config.dataset, KNOWN_DATASETS)
    _check_output(args.output, args.overwrite)
    if args.eval_dataset is not None:
        from .evaluation import EVAL_DATASETS

        _check_dataset(args.eval_dataset, tuple(EVAL_DATASETS))
        for flag, value in (("--eval-seq-len", args.eval_seq_len), ("--eval-windows", args.eval_windows)):
            if value < 2:
                raise UsageError(f"{flag} {value} is not allowed: use an integer >= 2")

    start = time.perf_counter()
    tokenizer = _load_tokenizer(args.model, config.tokenizer if isinstance(config.tokenizer, str) else None)
    config.tokenizer = tokenizer
    original_ppl = None
    if _is_gguf(args.model):
        # A GGUF file is read (dequantized) into memory first; transformers has no quantize-on-load path for it.
        from .api import quantize

        logger.info("loading %s (GGUF, dequantized to %s)", args.model, args.dtype)
        model = _load_model(args.model, args.dtype)
        if args.eval_dataset is not None:
            original_ppl = _eval_perplexity(model, tokenizer, args, "original")
        quantize(model, config, tokenizer=tokenizer)
    else:
        if args.eval_dataset is not None:
            # Quantize-on-load never holds the original model, so it is loaded (and dropped) for this first.
            original = _load_model(args.model, args.dtype)
            original_ppl = _eval_perplexity(original, tokenizer, args, "original")
            del original
        logger.info("loading and quantizing %s", args.model)
        model = _load_model(args.model, args.dtype, quantization_config=config)
    quantized_s = time.perf_counter() - start
    if args.eval_dataset is not None:
        _record_quality(model, _eval_perplexity(model, tokenizer, args, "quantized"), original_ppl, args)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"quantized {args.model} in {quantized_s:.1f} s; wrote {out} ({_folder_bytes(out) / 2**20:.1f} MiB)")

    if args.push_to_hub:
        info = push_folder(out, args.push_to_hub, private=args.private or None)
        print(f"pushed {out} to {args.push_to_hub}: {getattr(info, 'commit_url', info)}")
    return 0


def _eval_perplexity(model: Any, tokenizer: Any, args: argparse.Namespace, which: str) -> Any:
    from .evaluation import perplexity

    logger.info("perplexity of the %s model on %s", which, args.eval_dataset)
    return perplexity(
        model, tokenizer, args.eval_dataset, seq_len=args.eval_seq_len, max_windows=args.eval_windows, progress=False
    )


def _record_quality(model: Any, quantized: Any, original: Any, args: argparse.Namespace) -> None:
    """Store the measured perplexities in the quantization stats, which config.json and the model card show."""
    from .evaluation import EVAL_DATASETS, perplexity_record

    # A local file is named by its file name only: the absolute path means nothing to the card's readers.
    name = args.eval_dataset if args.eval_dataset in EVAL_DATASETS else os.path.basename(args.eval_dataset)
    label = f"{name} (test split)" if name in EVAL_DATASETS else name
    command = f"decoupleq quantize --eval-dataset {name} --eval-seq-len {args.eval_seq_len}"
    command += f" --eval-windows {args.eval_windows}"
    record = perplexity_record(quantized, original, dataset=label, seq_len=args.eval_seq_len, command=command)
    qcfg = model.config.quantization_config
    stats = getattr(qcfg, "quantization_stats", None) if not isinstance(qcfg, dict) else qcfg.get("quantization_stats")
    stats = dict(stats or {})
    stats["eval"] = {**(stats.get("eval") or {}), "perplexity": record}
    if isinstance(qcfg, dict):
        qcfg["quantization_stats"] = stats
    else:
        qcfg.quantization_stats = stats
    print(
        f"perplexity on {label} ({record['n_windows']} x {args.eval_seq_len} tokens): "
        + (f"{record['original']:.4f} original -> " if record["original"] is not None else "")
        + f"{record['quantized']:.4f} quantized"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """``decoupleq eval``: perplexity of a model on a text (non-overlapping windows)."""
    from .evaluation import EVAL_DATASETS, perplexity

    _check_model_spec(args.model)
    _check_device(args.device)
    _check_dataset(args.dataset, tuple(EVAL_DATASETS))
    for flag, value, low in (
        ("--seq-len", args.seq_len, 2),
        ("--max-windows", args.max_windows, 0),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise UsageError(f"{flag} {value} is not allowed: use an integer >= {low}")
    device = args.device or _default_device()
    tokenizer = _load_tokenizer(args.model, args.tokenizer)
    model = _load_model(args.model, args.dtype, device_map=device)
    result = perplexity(
        model,
        tokenizer,
        args.dataset,
        seq_len=args.seq_len,
        max_windows=args.max_windows or None,
        batch_size=args.batch_size,
        progress=True,
    )
    print(
        f"perplexity {result.ppl:.4f} (nll {result.nll:.5f} nats/token over {result.n_tokens} tokens, "
        f"{result.n_windows} windows of {args.seq_len})"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``decoupleq generate``: print the greedy continuation of --prompt."""
    import torch

    _check_model_spec(args.model)
    _check_device(args.device)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} is not allowed: use an integer >= 1")
    device = args.device or _default_device()
    tokenizer = _load_tokenizer(args.model, args.tokenizer)
    model = _load_model(args.model, args.dtype, device_map=device)
    enc = tokenizer(args.prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        # Greedy (do_sample=False) so the output is reproducible; the pad id silences transformers' open-end warning.
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    print(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``decoupleq export``: write a checkpoint as a GGUF file."""
    kind, _, qtype = args.format.partition(":")
    if kind.lower() != "gguf":
        raise UsageError(f"--format {args.format!r} is not supported: use gguf or gguf:TYPE")
    if not os.path.isdir(args.model):
        raise UsageError(f"checkpoint folder not found: {args.model!r}")
    if os.path.exists(args.output) and not args.overwrite:
        raise UsageError(f"--output {args.output!r} exists; pass --overwrite")
    from .export import export_gguf

    report = export_gguf(
        args.model,
        args.output,
        qtype or None,
        lossy=args.allow_lossy,
        embedding_type=args.embedding_type,
        tokenizer_pre=args.tokenizer_pre,
    )
    counts = ", ".join(f"{n} {t}" for t, n in sorted(report.type_counts().items()))
    lossy = f", {len(report.lossy)} tensors requantized" if report.lossy else ", exact up to fp16 scales"
    print(
        f"wrote {report.path} ({report.file_size / 2**20:.1f} MiB; {counts}); relative weight error of the "
        f"quantized layers {report.rel_error:.2e}{lossy}"
    )
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


class _LogSetup:
    """Send hf_decoupleq's log to stderr at the chosen level for the duration of one `main` call, then restore.

    Only the package's own logger is touched (not the root logger), so `main` can run inside other programs and tests
    without changing their logging.
    """

    def __init__(self, level: int, transformers_debug: bool):
        self.level = level
        self.transformers_debug = transformers_debug

    def __enter__(self) -> None:
        self.pkg = logging.getLogger("hf_decoupleq")
        self.saved_level = self.pkg.level
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        self.pkg.addHandler(self.handler)
        self.pkg.setLevel(self.level)
        if self.transformers_debug:
            from transformers.utils import logging as hf_logging

            self.saved_hf = hf_logging.get_verbosity()
            hf_logging.set_verbosity_debug()

    def __exit__(self, *exc: object) -> None:
        self.pkg.removeHandler(self.handler)
        self.pkg.setLevel(self.saved_level)
        if self.transformers_debug:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(self.saved_hf)


def _error(message: str) -> None:
    # One line, whatever the exception text holds.
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _usage_exceptions() -> tuple[type[BaseException], ...]:
    from .errors import DecoupleQConfigError, DecoupleQDataError

    return (UsageError, DecoupleQConfigError, DecoupleQDataError)


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed large blocks in the process instead of unmapping them.

    By default every tensor over 128 KiB is mmap'ed on allocation and unmapped on free, so each calibration batch
    page-faults its activations in again; on a small CPU that is about a quarter of a calibration pass. The CLI owns
    its process, so it may change this; the library never does (see the README's performance notes). Environment
    settings (MALLOC_MMAP_THRESHOLD_ etc.) or another allocator (jemalloc, tcmalloc) take precedence.
    """
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30), (m_top_pad, 1 << 28)):
        mallopt(option, value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``decoupleq`` command line with `argv` (default: ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        _error(exc)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    if args.command == "quantize":
        _keep_freed_memory()
    debug = getattr(args, "debug", False)
    verbose = getattr(args, "verbose", 0)
    level_name = getattr(args, "log_level", "debug" if verbose else "info")
    with _LogSetup(getattr(logging, level_name.upper()), transformers_debug=verbose >= 2):
        try:
            return COMMANDS[args.command](args)
        except _usage_exceptions() as exc:
            if debug:
                traceback.print_exc()
            _error(exc)
            return 2
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except Exception as exc:  # noqa: BLE001  (the CLI boundary: every failure becomes one line and exit 1)
            if debug:
                traceback.print_exc()
            _error(f"{type(exc).__name__}: {exc}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
