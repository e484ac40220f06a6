"""Crash-safe per-block results for resuming an interrupted quantization run (`checkpoint_dir`).

Layout of the directory:
- `manifest.json`: the settings that determine the result (`DecoupleQConfig.result_fingerprint()`), the model's
  identity, and per finished block its statistics and the sha256 of its tensor file.
- `block_00012.safetensors`: the packed state dict of finished block 12.

Every file is written to a temporary name in the same directory, flushed and fsync'ed, then renamed over the
final name (atomic on POSIX), and the directory entry is fsync'ed: a `kill -9` at any moment leaves either the old
or the new version, never a torn file. A block counts as finished only once the manifest lists it with a
matching checksum, so a block file written just before a crash but not yet in the manifest is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import DecoupleQCheckpointError
from .integration import find_linears, set_submodule
from .nn.linear import DecoupleQLinear

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORE_VERSION = 1


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary name beside `path` to write to: once the block ends it is fsync'ed and renamed over `path`, and
    the directory entry is fsync'ed; if the block raises, the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with _atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def calibration_fingerprint(windows: torch.Tensor, tokenizer: Any = None) -> dict[str, Any]:
    """What identifies the calibration data: the sha256 of the token windows (int64, row-major) and of the tokenizer's
    vocabulary (None for data given as token ids). Settings alone do not: another text of the same shape has them."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(str(list(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    vocab_digest = None
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        vocab = json.dumps(sorted(get_vocab().items()), ensure_ascii=False)
        vocab_digest = hashlib.sha256(vocab.encode()).hexdigest()
    return {"calibration_token_ids_sha256": digest.hexdigest(), "tokenizer_vocab_sha256": vocab_digest}


class ResumeStore:
    """Per-block results of one quantization run, in `directory`."""

    def __init__(self, directory: str, *, fingerprint: dict[str, Any], model_id: dict[str, Any]):
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, MANIFEST)
        expected = {"store_version": STORE_VERSION, "settings": fingerprint, "model": model_id}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                manifest = json.load(f)
            self._check_compatible(manifest, expected)
            self.manifest = manifest
            logger.info("resuming from %s: %d finished block(s)", self.directory, len(manifest["blocks"]))
        else:
            self.manifest = {**expected, "blocks": {}}
            self._write_manifest()

    def _check_compatible(self, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
        diffs = []
        for section in ("settings", "model"):
            old, new = manifest.get(section, {}), expected[section]
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    diffs.append(f"{key}: {old.get(key)!r} in the checkpoint directory, {new.get(key)!r} now")
        if manifest.get("store_version") != STORE_VERSION:
            diffs.append(f"store_version: {manifest.get('store_version')!r} vs {STORE_VERSION}")
        if diffs:
            raise DecoupleQCheckpointError(
                f"checkpoint_dir {self.directory!r} was written by a run with different settings, so it cannot be "
                "resumed: " + "; ".join(diffs) + ". Use the same settings, or another (or empty) checkpoint_dir."
            )

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.manifest, indent=2, sort_keys=True).encode())

    def _block_file(self, index: int) -> str:
        return os.path.join(self.directory, f"block_{index:05d}.safetensors")

    def has(self, index: int) -> bool:
        entry = self.manifest["blocks"].get(str(index))
        return entry is not None and os.path.exists(self._block_file(index))

    def stats(self, index: int) -> dict[str, Any]:
        return dict(self.manifest["blocks"][str(index)]["stats"])

    def save_block(self, index: int, block: nn.Module, stats: dict[str, Any]) -> None:
        path = self._block_file(index)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        with _atomic_file(path, suffix=".safetensors") as tmp:
            save_file(tensors, tmp)
        self.manifest["blocks"][str(index)] = {"sha256": _sha256(path), "stats": _json_safe(stats)}
        self._write_manifest()

    def load_block(
        self,
        index: int,
        block: nn.Module,
        *,
        bits: int,
        group_size: int,
        gguf_type: Callable[[str], str | None] | None = None,
    ) -> None:
        """Swap the block's quantized linears for packed modules and load the saved tensors into it (with
        `gguf_type`, a function from a layer's name within the block to its GGUF type, each layer's bits and group
        size are those of that type)."""
        path = self._block_file(index)
        entry = self.manifest["blocks"][str(index)]
        if _sha256(path) != entry["sha256"]:
            raise DecoupleQCheckpointError(f"{path} does not match its checksum in {self.path}; delete it to redo it")
        tensors = load_file(path)
        packed_names = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}
        rotated = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".hadamard_signs")}
        for name, linear in find_linears(block).items():
            if name in packed_names:
                b, g = bits, group_size
                qtype = None if gguf_type is None else gguf_type(name)
                if qtype is not None:
                    from .solver.kquant import layer_format

                    fmt = layer_format(qtype, linear.in_features, name)
                    b, g = fmt.packed_bits, fmt.group_size
                new = DecoupleQLinear.empty_like(linear, b, g, incoherence=name in rotated)
                set_submodule(block, name, new)
        device = next(iter(block.state_dict().values())).device
        missing, unexpected = block.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
        if missing or unexpected:
            raise DecoupleQCheckpointError(
                f"{path} does not fit the model's block {index}: missing {missing}, unexpected {unexpected}"
            )


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (float, int, str, bool)) or obj is None:
        return obj
    return str(obj)
