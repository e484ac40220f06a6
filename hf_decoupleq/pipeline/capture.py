"""Capture of the decoder blocks' inputs: the first block's hidden states and every block's keyword arguments."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been captured."""


@dataclass
class BlockInputs:
    """Calibration inputs of one decoder block: hidden states per batch (CPU) and, per batch, the keyword arguments
    the model passes to this block in a plain forward (`kwargs`).

    `all_kwargs[i]` holds those of block `i` (captured once, for every block: layers may differ, e.g. sliding or full
    attention masks, local or global RoPE). Identical dicts are shared between batches and blocks, and identical
    tensors between the dicts of one batch, so a model whose blocks all get the same arguments stores them once."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    all_kwargs: list[list[dict[str, Any]]] | None = None
    _on_device: dict[int, dict[str, Any]] = field(default_factory=dict)

    def kwargs_on(self, index: int, device: torch.device) -> dict[str, Any]:
        key = id(self.kwargs[index])
        if key not in self._on_device:
            self._on_device[key] = _to_device(self.kwargs[index], device)
        return self._on_device[key]

    def for_block(self, index: int, hidden: list[torch.Tensor]) -> BlockInputs:
        """The inputs of block `index`: the given hidden states with that block's own keyword arguments."""
        if self.all_kwargs is None:
            return BlockInputs(hidden, self.kwargs)
        return BlockInputs(hidden, self.all_kwargs[index], self.all_kwargs)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b if not isinstance(a, torch.Tensor) else False


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


# Keyword arguments dropped from the captured block inputs: calibration forwards run without a KV cache.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


class _ArgumentRecorder:
    """The forward pre-hooks of a capture: per block, the keyword arguments of every batch (CPU copies, with
    identical dicts and tensors shared), and the first block's hidden states."""

    def __init__(self, model: nn.Module, num_blocks: int) -> None:
        self.model_name = type(model).__name__
        self.last = num_blocks - 1
        self.hidden: list[torch.Tensor] = []
        self.per_block: list[list[dict[str, Any]]] = [[] for _ in range(num_blocks)]
        self.index = 0
        self.new_batch(0)

    def new_batch(self, index: int) -> None:
        self.index = index
        self.values: dict[int, torch.Tensor] = {}
        self.alive: list[torch.Tensor] = []
        self.dicts: list[dict[str, Any]] = []

    def capture(self, value: Any) -> Any:
        # One CPU copy per distinct tensor object within a batch (the model passes the same mask or RoPE tensors
        # to many blocks); the originals stay referenced until the batch ends, so their ids stay unique.
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key not in self.values:
                self.alive.append(value)
                self.values[key] = value.detach().to("cpu")
            return self.values[key]
        if isinstance(value, dict):
            return {k: self.capture(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.capture(v) for v in value)
        return value

    def hook(self, i: int):
        def hook(module, args, kwargs):
            self.record(i, args, dict(kwargs))

        return hook

    def record(self, i: int, args: tuple, kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise UnsupportedModelError(
                f"{self.model_name} passes {len(args) - 1} positional argument(s) besides the hidden states "
                "to its decoder blocks; hf-decoupleq replays only keyword arguments and cannot calibrate it"
            )
        if len(self.per_block[i]) > self.index:
            raise UnsupportedModelError(
                f"decoder block {i} of {self.model_name} runs more than once per forward pass; hf-decoupleq "
                "cannot calibrate shared blocks"
            )
        for key in _CACHE_KWARGS:
            kwargs.pop(key, None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured = self.capture(kwargs)
        if i == 0:
            self.hidden.append(h.detach().to("cpu"))
        previous = self.per_block[i][-1] if self.per_block[i] else None
        if previous is not None and _same(previous, captured):
            captured = previous
        else:
            captured = next((d for d in self.dicts if _same(d, captured)), captured)
        if not any(d is captured for d in self.dicts):
            self.dicts.append(captured)
        self.per_block[i].append(captured)
        if i == self.last:
            raise StopForward


def _identity(h=None, *args, **kwargs):
    return kwargs["hidden_states"] if h is None else h


@contextlib.contextmanager
def _recording(block_list: Sequence[nn.Module], recorder: _ArgumentRecorder) -> Iterator[None]:
    """Hook every block's arguments and let the blocks pass their hidden states through uncomputed.

    Hooks cannot skip a module's computation, so each block's forward is the identity for the duration (attention
    masks and position embeddings are computed by the model before its block loop, not from the hidden states);
    whatever forward the block had (its class's, or e.g. an accelerate offload wrapper) is put back afterwards."""
    handles = []
    saved_forwards: list[tuple[nn.Module, Any]] = []
    try:
        for i, block in enumerate(block_list):
            handles.append(block.register_forward_pre_hook(recorder.hook(i), with_kwargs=True))
            saved_forwards.append((block, block.__dict__.get("forward")))
            block.forward = _identity
        yield
    finally:
        for h in handles:
            h.remove()
        for block, forward in saved_forwards:
            if forward is None:
                del block.forward
            else:  # e.g. an accelerate offload hook's wrapper
                block.forward = forward


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.Module | Sequence[nn.Module], windows: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Run the model on the calibration windows and keep the first block's hidden-state inputs and every block's
    keyword arguments (`BlockInputs.all_kwargs`), exactly as a plain forward passes them.

    `blocks` is the decoder's block list (or a single block: then only its inputs are captured). The blocks do not
    compute during the capture (see `_recording`), and the forward ends at the last block.
    """
    block_list = [blocks] if not isinstance(blocks, (nn.ModuleList, list, tuple)) else list(blocks)
    recorder = _ArgumentRecorder(model, len(block_list))
    device = _input_device(model)
    num_batches = (windows.shape[0] + batch_size - 1) // batch_size
    with _recording(block_list, recorder):
        for index, start in enumerate(range(0, windows.shape[0], batch_size)):
            recorder.new_batch(index)
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    recorder.new_batch(0)  # drop the last batch's references
    if len(recorder.hidden) != num_batches:
        raise UnsupportedModelError(
            "the model's forward did not reach its first decoder block; hf-decoupleq cannot calibrate it"
        )
    unreached = [i for i, kw in enumerate(recorder.per_block) if len(kw) != num_batches]
    if unreached:
        raise UnsupportedModelError(
            f"the model's forward did not reach its decoder block(s) {unreached}; hf-decoupleq cannot calibrate it"
        )
    return BlockInputs(recorder.hidden, recorder.per_block[0], recorder.per_block)
