"""`ChildReplay`: recorded outputs of a block's children, replayed instead of recomputed once they are final."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


class ChildReplay:
    """Memoized outputs of a block's children (e.g. `self_attn`) whose computation can no longer change.

    Within one block the true-sequential passes run the same prefix again and again: once `q, k, v, o` are quantized,
    the attention module's output is fixed for every later pass. A child is *final* once every linear called up to
    the end of its forward (in the traced call order) is quantized; its outputs are recorded (by a forward hook) the
    first time it runs while final, and afterwards a `_RecordedChild` stands in its place in the block for the
    duration of a pass and returns them (a fresh copy each time, so in-place updates downstream cannot corrupt it).
    Replay is exact: the same deterministic computation on the same inputs gives the same values.

    `quantize_block` calls `track` with the block's traced linear calls before its first pass.
    """

    def __init__(self, block: nn.Module, trace: Sequence[str], num_batches: int) -> None:
        self._block = block
        self._children = dict(block.named_children())
        self.track(trace, num_batches)

    def track(self, trace: Sequence[str], num_batches: int) -> None:
        """Follow the block's linear calls `trace` (in call order) over `num_batches` batches; forgets any recording
        and any final outputs."""
        self.num_batches = num_batches
        self.current = 0
        self.outputs: dict[str, list[Any]] = {}
        self.upstream: dict[str, set[str]] = {}
        self.final_forward_ok = False
        self.final_outputs: list[torch.Tensor] | None = None
        for child_name in self._children:
            prefix = child_name + "."
            positions = [i for i, name in enumerate(trace) if name.startswith(prefix)]
            if positions:
                self.upstream[child_name] = set(trace[: max(positions) + 1])

    def upstream_all(self) -> set[str]:
        return set().union(*self.upstream.values()) if self.upstream else set()

    def final_children(self, quantized: set[str]) -> list[str]:
        return [c for c, needed in self.upstream.items() if needed <= quantized]

    def complete(self, child: str) -> bool:
        outs = self.outputs.get(child)
        return outs is not None and all(o is not None for o in outs)

    @contextlib.contextmanager
    def active(self, quantized: set[str], record: bool = True) -> Iterator[None]:
        """Replay the final children that are recorded; record the final ones that are not (if `record`)."""
        handles: list[Any] = []
        replaced: list[str] = []
        calls: dict[str, int] = {}
        try:
            for name in self.final_children(quantized):
                child = self._children[name]
                if getattr(self._block, name) is not child:
                    continue  # a linear child that was since swapped for its fake-quant layer: not followed
                if self.complete(name):
                    setattr(self._block, name, _RecordedChild(self, name, child))
                    replaced.append(name)
                elif record:
                    self.outputs.setdefault(name, [None] * self.num_batches)
                    handles.append(child.register_forward_hook(functools.partial(self._record, name, calls)))
            yield
        finally:
            for h in handles:
                h.remove()
            for name in replaced:
                setattr(self._block, name, self._children[name])
        for name, count in calls.items():
            if count > 0 and name in self.outputs and self.complete(name) and count != self.num_batches:
                # Called more than once per batch: the per-batch memo would be wrong; never replay it.
                self.upstream.pop(name, None)
                self.outputs.pop(name, None)

    def _record(self, name: str, calls: dict[str, int], module, args, output) -> None:
        calls[name] = calls.get(name, 0) + 1
        self.outputs[name][self.current] = _copy_to(output, torch.device("cpu"))

    def replayed(self, name: str, *args, **kwargs) -> Any:
        """The recorded output of child `name` for the current batch, on the device of the call's inputs."""
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:
            device = next((v.device for v in kwargs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        return _copy_to(self.outputs[name][self.current], device)


class _RecordedChild(nn.Module):
    """Stands in a block for a final child during a pass: its forward returns the recording. Attributes that the
    block reads from the child (other than its forward) come from the child itself, which is left untouched."""

    def __init__(self, replay: ChildReplay, name: str, child: nn.Module) -> None:
        super().__init__()
        self._replay = replay
        self._name = name
        object.__setattr__(self, "_child", child)  # not a submodule: the block's parameters stay the child's own

    def forward(self, *args, **kwargs) -> Any:
        return self._replay.replayed(self._name, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_child"], name)


def _copy_to(obj: Any, device: torch.device) -> Any:
    """A fresh copy of the tensors in `obj` on `device` (detached)."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().to(device)
        return out.clone() if out.data_ptr() == obj.data_ptr() else out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _copy_to(v, device) for k, v in obj.items()}
    return obj
