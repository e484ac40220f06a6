"""`quantize_model`: the block-by-block decoupleQ loop (the only HF-aware orchestration).

For each decoder block, in order:
1. run the full-precision block on its (already quantized-path) inputs, keeping the outputs as block-wise
   targets and collecting the Hessian of the first sub-group of linears;
2. true-sequential sub-groups (linears that read the same input tensor, e.g. `[q, k, v]`, `o`, `[gate, up]`,
   `down`, discovered by tracing one forward): collect `H` with the earlier sub-groups already quantized, solve
   each linear with the layer-wise solver and swap in a differentiable fake-quant linear;
3. the block-wise stage trains scales, zeros and norm weights against the targets;
4. pack into `DecoupleQLinear` and run the packed block to produce the next block's inputs.

Calibration activations stay on the CPU and move to the compute device one batch at a time, so peak
accelerator memory is about one block plus one batch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import hardware
from .config import AUTO, DecoupleQConfig
from .errors import DecoupleQError, DecoupleQNumericalError, UnsupportedModelError
from .hadamard import has_transform, random_signs, transform_hessian, transform_weight
from .integration import check_quantizable, find_decoder_blocks, find_linears, set_submodule
from .nn.linear import DecoupleQLinear
from .packing import required_format_version
from .resume import ResumeStore, calibration_fingerprint
from .solver import FakeQuantLinear, HessianAccumulator, refine_block, solve_layer

logger = logging.getLogger(__name__)


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


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` for calibration forwards (None: compute in the weights' own dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _calibration_dtype(
    config: DecoupleQConfig, model: nn.Module, device: torch.device | None = None
) -> torch.dtype | None:
    """The autocast dtype for `config.calibration_dtype`, or None when the model already computes in it.

    "auto" resolves with `hardware.auto_calibration_dtype` for the compute `device` (default: `_compute_device`)."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point() and p.device.type != "meta"}
    name = config.calibration_dtype
    if name == AUTO:
        name = hardware.auto_calibration_dtype(weights, device if device is not None else _compute_device(config, model))
    if name is None:
        return None
    dtype = getattr(torch, name)
    if weights == {dtype}:
        return None
    if any(w.itemsize < dtype.itemsize for w in weights):
        raise DecoupleQError(
            f"calibration_dtype={config.calibration_dtype!r} is wider than the model's weights "
            f"({', '.join(sorted(str(w).removeprefix('torch.') for w in weights))}); autocast can only lower "
            "precision: load the model in that dtype instead, or leave calibration_dtype=None"
        )
    return dtype


def _calibration_batch_size(config: DecoupleQConfig, model: nn.Module, device: torch.device) -> int:
    """`config.batch_size`, or for "auto" what fits the free memory of `device` (`hardware.auto_batch_size`)."""
    if config.batch_size != AUTO:
        return config.batch_size
    return hardware.auto_batch_size(
        getattr(model, "config", None),
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        free_bytes=hardware.free_memory_bytes(device),
        activations_on_device=device.type == "cpu",
    )


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise DecoupleQNumericalError(f"non-finite values (NaN/Inf) in {what}")


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


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.Module | Sequence[nn.Module], windows: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Run the model on the calibration windows and keep the first block's hidden-state inputs and every block's
    keyword arguments (`BlockInputs.all_kwargs`), exactly as a plain forward passes them.

    `blocks` is the decoder's block list (or a single block: then only its inputs are captured). The blocks do not
    compute during the capture: each one's forward is replaced by the identity while its arguments are recorded
    (attention masks and position embeddings are computed by the model before its block loop, not from the hidden
    states), and the forward ends at the last block.
    """
    block_list = [blocks] if not isinstance(blocks, (nn.ModuleList, list, tuple)) else list(blocks)
    last = len(block_list) - 1
    hidden: list[torch.Tensor] = []
    per_block: list[list[dict[str, Any]]] = [[] for _ in block_list]
    batch = {"index": 0, "values": {}, "alive": [], "dicts": []}

    def capture(value: Any) -> Any:
        # One CPU copy per distinct tensor object within a batch (the model passes the same mask or RoPE tensors
        # to many blocks); the originals stay referenced until the batch ends, so their ids stay unique.
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key not in batch["values"]:
                batch["alive"].append(value)
                batch["values"][key] = value.detach().to("cpu")
            return batch["values"][key]
        if isinstance(value, dict):
            return {k: capture(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(capture(v) for v in value)
        return value

    def make_hook(i: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:
                raise UnsupportedModelError(
                    f"{type(model).__name__} passes {len(args) - 1} positional argument(s) besides the hidden states "
                    "to its decoder blocks; hf-decoupleq replays only keyword arguments and cannot calibrate it"
                )
            if len(per_block[i]) > batch["index"]:
                raise UnsupportedModelError(
                    f"decoder block {i} of {type(model).__name__} runs more than once per forward pass; hf-decoupleq "
                    "cannot calibrate shared blocks"
                )
            for key in _CACHE_KWARGS:
                kwargs.pop(key, None)
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            captured = capture(kwargs)
            if i == 0:
                hidden.append(h.detach().to("cpu"))
            previous = per_block[i][-1] if per_block[i] else None
            if previous is not None and _same(previous, captured):
                captured = previous
            else:
                captured = next((d for d in batch["dicts"] if _same(d, captured)), captured)
            if not any(d is captured for d in batch["dicts"]):
                batch["dicts"].append(captured)
            per_block[i].append(captured)
            if i == last:
                raise StopForward

        return hook

    def identity(h=None, *args, **kwargs):
        return kwargs["hidden_states"] if h is None else h

    handles = []
    saved_forwards: list[tuple[nn.Module, Any]] = []
    for i, block in enumerate(block_list):
        handles.append(block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        saved_forwards.append((block, block.__dict__.get("forward")))
        block.forward = identity
    device = _input_device(model)
    num_batches = (windows.shape[0] + batch_size - 1) // batch_size
    try:
        for batch["index"], start in enumerate(range(0, windows.shape[0], batch_size)):
            batch.update(values={}, alive=[], dicts=[])
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        for block, forward in saved_forwards:
            if forward is None:
                del block.forward
            else:  # e.g. an accelerate offload hook's wrapper
                block.forward = forward
    batch.clear()
    if len(hidden) != num_batches:
        raise UnsupportedModelError(
            "the model's forward did not reach its first decoder block; hf-decoupleq cannot calibrate it"
        )
    unreached = [i for i, kw in enumerate(per_block) if len(kw) != num_batches]
    if unreached:
        raise UnsupportedModelError(
            f"the model's forward did not reach its decoder block(s) {unreached}; hf-decoupleq cannot calibrate it"
        )
    return BlockInputs(hidden, per_block[0], per_block)


class ChildReplay:
    """Memoized outputs of a block's children (e.g. `self_attn`) whose computation can no longer change.

    Within one block the true-sequential passes run the same prefix again and again: once `q, k, v, o` are quantized,
    the attention module's output is fixed for every later pass. A child is *final* once every linear called up to
    the end of its forward (in the traced call order) is quantized; its outputs are recorded the first time it runs
    while final and replayed afterwards (a fresh copy each time, so in-place updates downstream cannot corrupt it).
    Replay is exact: the same deterministic computation on the same inputs gives the same values.
    """

    def __init__(self, block: nn.Module, trace: Sequence[str], num_batches: int) -> None:
        self.num_batches = num_batches
        self.current = 0
        self.outputs: dict[str, list[Any]] = {}
        self.upstream: dict[str, set[str]] = {}
        self.final_forward_ok = False
        self.final_outputs: list[torch.Tensor] | None = None
        for child_name, child in block.named_children():
            prefix = child_name + "."
            positions = [i for i, name in enumerate(trace) if name.startswith(prefix)]
            if positions:
                self.upstream[child_name] = set(trace[: max(positions) + 1])
        self._children = dict(block.named_children())

    def upstream_all(self) -> set[str]:
        return set().union(*self.upstream.values()) if self.upstream else set()

    def final_children(self, quantized: set[str]) -> list[str]:
        return [c for c, needed in self.upstream.items() if needed <= quantized]

    def complete(self, child: str) -> bool:
        outs = self.outputs.get(child)
        return outs is not None and all(o is not None for o in outs)

    @contextlib.contextmanager
    def active(self, quantized: set[str], record: bool = True):
        """Replay the final children that are recorded; record the final ones that are not (if `record`)."""
        handles: list[Any] = []
        patched: list[nn.Module] = []
        calls: dict[str, int] = {}
        try:
            for name in self.final_children(quantized):
                child = self._children[name]
                if self.complete(name):
                    child.forward = functools.partial(self._replay, name)
                    patched.append(child)
                elif record:
                    self.outputs.setdefault(name, [None] * self.num_batches)
                    handles.append(child.register_forward_hook(functools.partial(self._record, name, calls)))
            yield
        finally:
            for h in handles:
                h.remove()
            for child in patched:
                del child.forward
        for name, count in calls.items():
            if count > 0 and name in self.outputs and self.complete(name) and count != self.num_batches:
                # Called more than once per batch: the per-batch memo would be wrong; never replay it.
                self.upstream.pop(name, None)
                self.outputs.pop(name, None)

    def _record(self, name: str, calls: dict[str, int], module, args, output) -> None:
        calls[name] = calls.get(name, 0) + 1
        self.outputs[name][self.current] = _copy_to(output, torch.device("cpu"))

    def _replay(self, name: str, *args, **kwargs) -> Any:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:
            device = next((v.device for v in kwargs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        return _copy_to(self.outputs[name][self.current], device)


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


@torch.no_grad()
def _forward_all(
    block: nn.Module,
    inputs: BlockInputs,
    device: torch.device,
    keep: bool = True,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
) -> list[torch.Tensor]:
    outputs = []
    for i, h in enumerate(inputs.hidden):
        if replay is not None:
            replay.current = i
        try:
            with _autocast(device, compute_dtype):
                out = _block_output(block(h.to(device), **inputs.kwargs_on(i, device)))
            out = out.to(h.dtype)
        except StopForward:
            continue
        if keep:
            outputs.append(out.detach().to("cpu"))
    return outputs


@torch.no_grad()
def discover_sequential_groups(
    block: nn.Module,
    linears: dict[str, nn.Module],
    inputs: BlockInputs,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    trace: list[str] | None = None,
) -> list[list[str]]:
    """Trace one forward and group linears that read the very same input tensor, in call order.

    For Llama this yields `[[q, k, v], [o], [gate, up], [down]]`; for OPT `[[q, k, v], [out], [fc1], [fc2]]`.
    If `trace` is given, it receives every linear call of that forward, in order (repeats included).
    """
    calls: list[tuple[str, int]] = []
    handles = []
    kept_alive = []

    def make_hook(name):
        def hook(module, args):
            kept_alive.append(args[0])  # keep the tensor alive so ids stay unique during the trace
            calls.append((name, id(args[0])))

        return hook

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        with _autocast(device, compute_dtype):
            block(inputs.hidden[0].to(device), **inputs.kwargs_on(0, device))
    finally:
        for h in handles:
            h.remove()
    if trace is not None:
        trace.extend(name for name, _ in calls)
    groups: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for name, input_id in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and input_id == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = input_id
    never_called = [n for n in linears if n not in seen]
    if never_called:
        logger.warning(
            "linears %s were not called by the block's forward; they stay dense (and reload dense)", never_called
        )
    return groups


def _collect_hessians(
    block: nn.Module,
    linears: dict[str, nn.Module],
    groups: Sequence[Sequence[str]],
    inputs: BlockInputs,
    device: torch.device,
    *,
    block_name: str,
    keep_outputs: bool,
    stop_after: str | None,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
    quantized: set[str] | None = None,
) -> tuple[dict[str, HessianAccumulator], list[torch.Tensor]]:
    """One pass over the calibration batches with hooks filling one accumulator per sub-group."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []

    for group in groups:
        first = group[0]
        # Per-batch X^T X in float32 (half the cost of float64 on CPU), summed over batches in float64.
        acc = HessianAccumulator(
            linears[first].in_features, device=device, name=f"{block_name}.{first}", matmul_dtype=torch.float32
        )
        for name in group:
            accs[name] = acc

        def hook(module, args, acc=acc):
            acc.add(args[0])  # non-finite batches are counted there and reported by hessian() with the layer name

        handles.append(linears[first].register_forward_pre_hook(hook))
    if stop_after is not None:

        def stop(module, args, output):
            raise StopForward

        handles.append(linears[stop_after].register_forward_hook(stop))
    try:
        with replay.active(quantized or set()) if replay is not None else contextlib.nullcontext():
            outputs = _forward_all(block, inputs, device, keep=keep_outputs, compute_dtype=compute_dtype, replay=replay)
    finally:
        for h in handles:
            h.remove()
    return accs, outputs


def _solve_kwargs(config: DecoupleQConfig) -> dict[str, Any]:
    return {
        "bits": config.bits,
        "group_size": config.group_size,
        "method": config.method,
        "rounds": config.rounds,
        "act_order": config.act_order,
        "damp": config.damp,
        "symmetric": config.symmetric,
        "integer_zero": config.integer_zero,
        "gguf_type": config.gguf_type,
    }


def _materialize_block(block: nn.Module, device: torch.device, block_name: str) -> bool:
    """Give an accelerate-offloaded block (weights on meta, real ones in a CPU/disk map) real weights on `device`
    and drop its offload hook, so the solver never sees meta tensors. Returns True if the block was offloaded."""
    if not any(t.device.type == "meta" for t in list(block.parameters()) + list(block.buffers())):
        return False
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    # accelerate hooks each offloaded module (often the leaves) with a map of its own tensors.
    values: list[tuple[nn.Module, str, torch.Tensor]] = []
    for mod_name, module in block.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if tensor.device.type != "meta":
                continue
            weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
            if weights_map is None:
                raise DecoupleQError(
                    f"{block_name}.{mod_name}.{name} is on the meta device with no accelerate offload map to read it "
                    "from; load the model with a device_map that places or offloads every block with accelerate"
                )
            try:
                values.append((module, name, weights_map[name]))
            except KeyError as exc:
                raise DecoupleQError(
                    f"offloaded weight {block_name}.{mod_name}.{name} is missing from accelerate's map"
                ) from exc
    remove_hook_from_module(block, recurse=True)
    for module, name, value in values:
        set_module_tensor_to_device(module, name, device, value=value)
    return True


def quantize_block(
    block: nn.Module,
    inputs: BlockInputs,
    config: DecoupleQConfig,
    *,
    block_name: str,
    block_index: int,
    skip: Sequence[str],
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
) -> dict[str, Any]:
    """Quantize one decoder block in place (its linears become `DecoupleQLinear`). Returns per-block statistics.

    `compute_dtype` (from `_calibration_dtype`) autocasts the block's forwards; the solver is unaffected. A `replay`
    (see `ChildReplay`) is filled here and may be reused by `forward_quantized_block` afterwards."""
    t0 = time.perf_counter()
    # The block-wise stage trains in float32; every parameter goes back to its own dtype afterwards.
    param_dtypes = {name: p.dtype for name, p in block.named_parameters()}
    linears = find_linears(block, f"{block_name}.", skip)
    stats: dict[str, Any] = {"index": block_index, "layers": {}}
    if not linears:
        return stats
    for name, linear in linears.items():
        _check_finite(linear.weight, f"the weight of {block_name}.{name}")
    trace: list[str] = []
    groups = discover_sequential_groups(block, linears, inputs, device, compute_dtype, trace=trace)
    if replay is not None:
        replay.__init__(block, trace, len(inputs.hidden))
    solve_kwargs = _solve_kwargs(config)
    fake: dict[str, FakeQuantLinear] = {}
    originals: dict[str, nn.Linear] = {}

    timing = {"passes": 0.0, "solve": 0.0}

    def solve_group(group: Sequence[str], accs: dict[str, HessianAccumulator]) -> None:
        t_solve = time.perf_counter()
        H = accs[group[0]].hessian()
        # One rotation per input (format 3): the linears of a group read the same tensor, so they share the signs
        # drawn for the group's first layer, and the rotated Hessian V H V^T is computed once for all of them.
        signs = _incoherence_signs(config, f"{block_name}.{group[0]}", linears[group[0]].in_features, device)
        H_rot = None if signs is None else transform_hessian(H, signs)
        for name in group:
            linear = linears[name]
            full_name = f"{block_name}.{name}"
            weight, H_layer = linear.weight.detach().to(device), H
            if signs is not None:
                # Quantize W V^T against V H V^T; the proxy loss is the same as in the original basis, since V is
                # orthogonal.
                weight, H_layer = transform_weight(weight.float(), signs), H_rot
            result = solve_layer(weight, H_layer, name=full_name, **solve_kwargs)
            bias = None if linear.bias is None else linear.bias.detach().to(device=device, dtype=torch.float32)
            fq = FakeQuantLinear.from_result(result, bias=bias, hadamard_signs=signs)
            originals[name] = linear
            fake[name] = fq
            set_submodule(block, name, fq)
            mean_loss = float(result.loss.mean())
            stats["layers"][name] = mean_loss
            logger.info("%s.%s: %s proxy loss %.6g", block_name, name, config.method, mean_loss)
        timing["solve"] += time.perf_counter() - t_solve

    # Pass 1: full-precision outputs (block-wise targets) + the first sub-group's Hessian (or every sub-group's).
    first_groups = groups[:1] if config.true_sequential else groups
    need_targets = config.blockwise and config.blockwise_epochs > 0
    # Without targets to keep, the first pass can stop as soon as the first sub-group has seen its input.
    stop_first = None if (need_targets or not config.true_sequential) else groups[0][-1]
    t_pass = time.perf_counter()
    accs, targets = _collect_hessians(
        block, linears, first_groups, inputs, device, block_name=block_name, keep_outputs=need_targets,
        stop_after=stop_first, compute_dtype=compute_dtype,
    )
    timing["passes"] += time.perf_counter() - t_pass
    for group in first_groups:
        solve_group(group, accs)
    if config.true_sequential:
        for group in groups[1:]:
            live = {n: fake.get(n, linears[n]) for n in linears}
            live.update({n: linears[n] for n in group})
            t_pass = time.perf_counter()
            accs, _ = _collect_hessians(
                block, live, [group], inputs, device, block_name=block_name, keep_outputs=False, stop_after=group[-1],
                compute_dtype=compute_dtype, replay=replay, quantized=set(fake),
            )
            timing["passes"] += time.perf_counter() - t_pass
            solve_group(group, accs)
    stats["layerwise_loss"] = sum(stats["layers"].values()) / max(len(stats["layers"]), 1)

    stats["seconds_calibration_passes"] = timing["passes"]
    stats["seconds_solve"] = timing["solve"]
    refined_outputs = None
    if need_targets:
        t_refine = time.perf_counter()
        orig_dtype = next(iter(param_dtypes.values()))
        initial_loss = None
        if replay is not None and orig_dtype == torch.float32:
            # The loss before training, with the recorded attention outputs replayed (refine_block would run the
            # whole block once more for it; this is the same computation, so the same number).
            with replay.active(set(fake), record=False):
                before = _forward_all(block, inputs, device, compute_dtype=compute_dtype, replay=replay)
            initial_loss = sum(float(F.mse_loss(o.float(), t.float())) for o, t in zip(before, targets)) / len(before)
            del before
        block.float()
        result = refine_block(
            block,
            inputs.hidden,
            targets,
            [inputs.kwargs_on(i, device) for i in range(len(inputs.hidden))],
            lr=config.effective_blockwise_lr,
            optimizer=config.blockwise_optimizer,
            epochs=config.blockwise_epochs,
            weight_decay=config.blockwise_weight_decay,
            train_norms=config.train_norms,
            seed=config.seed + block_index,
            autocast_dtype=compute_dtype,
            return_outputs=replay is not None,
            micro_batch=1,  # one Adam step per calibration window, whatever the forward batch size
            initial_loss=initial_loss,
        )
        refined_outputs = result.outputs
        for name, param in block.named_parameters():
            if name in param_dtypes:  # norms and other trained float parameters (not the fake-quant layers)
                param.data = param.data.to(param_dtypes[name])
        stats["blockwise_initial_mse"] = result.initial_loss
        stats["blockwise_final_mse"] = result.final_loss
        stats["seconds_blockwise"] = time.perf_counter() - t_refine
        logger.info(
            "%s: block-wise MSE %.6g -> %.6g", block_name, result.initial_loss, result.final_loss
        )
        del targets

    same_as_recorded = not need_targets
    same_as_trained = need_targets
    for name, fq in fake.items():
        original = originals[name]
        packed = DecoupleQLinear.from_linear(
            original, fq.to_result(), dtype=original.weight.dtype, hadamard_signs=fq.hadamard_signs
        )
        if fq.bias is not None and original.bias is not None:
            packed.bias.copy_(fq.bias.detach().to(packed.bias.dtype))
        packed = packed.to(device)
        set_submodule(block, name, packed)
        same = _same_fake(fq, fake_from_packed(packed))
        same_as_recorded = same_as_recorded and same
        same_as_trained = same_as_trained and same
    if replay is not None:
        # The block-wise stage's final evaluation ran exactly the packed values (float32 models): its outputs are
        # the next block's inputs, bit for bit what forward_quantized_block would compute.
        if same_as_trained and refined_outputs is not None and next(block.parameters()).dtype == torch.float32:
            replay.final_outputs = refined_outputs
        # The recorded outputs came from these fake-quant layers; the next block's inputs are computed from the
        # packed ones (see forward_quantized_block), so replay there only if both give the very same weights.
        replay.final_forward_ok = same_as_recorded
    stats["seconds"] = time.perf_counter() - t0
    logger.debug(
        "%s: %.1f s (calibration passes %.1f s, solver %.1f s, block-wise %.1f s)", block_name, stats["seconds"],
        timing["passes"], timing["solve"], stats.get("seconds_blockwise", 0.0),
    )  # fmt: skip
    return stats


def _incoherence_signs(
    config: DecoupleQConfig, full_name: str, in_features: int, device: torch.device
) -> torch.Tensor | None:
    """The layer's Hadamard signs when `config.incoherence` (None otherwise, or for an odd `in_features`)."""
    if not config.incoherence:
        return None
    if not has_transform(in_features):
        logger.warning(
            "%s: in_features=%d is odd, so it has no Hadamard block; incoherence processing skips this layer",
            full_name, in_features,
        )  # fmt: skip
        return None
    return random_signs(in_features, config.seed, full_name, device=device)


def fake_from_packed(packed: DecoupleQLinear) -> FakeQuantLinear:
    """A `FakeQuantLinear` with exactly the packed module's codes, scales, zeros, bias (float32) and Hadamard
    signs (incoherence)."""
    bias = None if packed.bias is None else packed.bias.detach().float()
    return FakeQuantLinear(
        packed._codes().contiguous(),
        packed.scales.detach().float().T,
        packed.zeros.detach().float().T,
        packed.effective_group_size,
        packed.bits,
        bias=bias,
        hadamard_signs=packed.hadamard_signs,
    )


def _same_fake(a: FakeQuantLinear, b: FakeQuantLinear) -> bool:
    return all(
        _same(x, y)
        for x, y in (
            (a.codes, b.codes),
            (a.scales.detach(), b.scales.detach()),
            (a.zeros.detach(), b.zeros.detach()),
            (None if a.bias is None else a.bias.detach().float(), None if b.bias is None else b.bias.detach()),
            (a.hadamard_signs, b.hadamard_signs),
        )
    )


@torch.no_grad()
def forward_quantized_block(
    block: nn.Module,
    inputs: BlockInputs,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
) -> list[torch.Tensor]:
    """The next block's inputs: `block` run with each `DecoupleQLinear` as a float32 fake-quant copy of its packed
    tensors (one dense weight per layer instead of a dequantization per call). A freshly quantized block and one
    restored from a checkpoint give bit-identical outputs, since both are computed from the packed tensors."""
    if replay is not None and replay.final_outputs is not None:
        return replay.final_outputs
    packed = {name: m for name, m in block.named_modules() if isinstance(m, DecoupleQLinear)}
    for name, module in packed.items():
        fq = fake_from_packed(module)
        dense = fq.effective_weight().detach()
        fq.forward = functools.partial(_dense_forward, dense, fq.bias)
        set_submodule(block, name, fq)
    try:
        if replay is not None and replay.final_forward_ok:
            with replay.active(replay.upstream_all(), record=False):
                return _forward_all(block, inputs, device, compute_dtype=compute_dtype, replay=replay)
        return _forward_all(block, inputs, device, compute_dtype=compute_dtype)
    finally:
        for name, module in packed.items():
            set_submodule(block, name, module)


def _dense_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    # Same math as FakeQuantLinear.forward without autograd: the dequantized weight, any incoherence rotation
    # folded in (W_hat V), computed once.
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _compute_device(config: DecoupleQConfig, block: nn.Module) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    for t in list(block.parameters()) + list(block.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def quantize_model(model: nn.Module, config: DecoupleQConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Calibrate and quantize `model` in place with decoupleQ; returns statistics (also stored in the config).

    Args:
        model: a transformers causal LM with full-precision weights loaded.
        config: the `DecoupleQConfig`; its calibration fields say which data to use.
        tokenizer: overrides `config.tokenizer` (which falls back to the model's `name_or_path`).
    """
    from .calibration.data import get_calibration_windows, resolve_tokenizer

    # The oldest format that can read the result: incoherent layers need readers that know `hadamard_signs`.
    config.format_version = required_format_version(config.incoherence)
    t_start = time.perf_counter()
    original_bytes = _state_bytes(model)
    prefix, blocks = find_decoder_blocks(model)
    skip = config.effective_modules_to_not_convert
    check_quantizable(model, skip)
    tok = tokenizer if tokenizer is not None else config.tokenizer
    needs_tokenizer = not _is_tokenized(config.dataset)
    if tok is None and needs_tokenizer:
        tok = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if needs_tokenizer:
        tok = resolve_tokenizer(tok)
    windows = get_calibration_windows(
        config.dataset,
        tok,
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        model=model,
    )
    # "auto" settings are resolved once, for the device the first block is solved on.
    first_device = _compute_device(config, blocks[0])
    compute_dtype = _calibration_dtype(config, model, first_device)
    batch_size = _calibration_batch_size(config, model, first_device)
    resolved = {
        "batch_size": batch_size,
        "calibration_dtype": None if compute_dtype is None else str(compute_dtype).removeprefix("torch."),
    }
    logger.info(
        "calibration on %s: batch_size %d%s, calibration_dtype %s%s", hardware.describe_device(first_device), batch_size,
        " (auto)" if config.batch_size == AUTO else "", resolved["calibration_dtype"] or "the model's dtype",
        " (auto)" if config.calibration_dtype == AUTO else "",
    )  # fmt: skip
    store = None
    if config.checkpoint_dir is not None:
        store = ResumeStore(
            config.checkpoint_dir,
            fingerprint={**config.result_fingerprint(**resolved), **calibration_fingerprint(windows, tok)},
            model_id=_model_identity(model, len(blocks)),
        )
    was_training = model.training
    model.eval()
    block_stats: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks, windows, batch_size)
        for h in inputs.hidden:
            _check_finite(h, "the calibration activations entering the first decoder block")
        bar = tqdm(range(len(blocks)), desc="decoupleQ", unit="block")
        for index in bar:
            block = blocks[index]
            block_name = f"{prefix}.{index}" if prefix else str(index)
            home = _home_device(block)
            device = _compute_device(config, block)
            offloaded = _materialize_block(block, device, block_name)
            block.to(device)
            replay = ChildReplay(block, [], len(inputs.hidden))
            if store is not None and store.has(index):
                store.load_block(
                    index, block, bits=config.bits, group_size=config.group_size, gguf_type=config.gguf_type
                )
                stats = store.stats(index)
                logger.info("%s: restored from %s", block_name, config.checkpoint_dir)
            else:
                stats = quantize_block(
                    block, inputs, config, block_name=block_name, block_index=index, skip=skip, device=device,
                    compute_dtype=compute_dtype, replay=replay,
                )
                if store is not None:
                    store.save_block(index, block, stats)
            block_stats.append(stats)
            if index + 1 < len(blocks):
                outputs = forward_quantized_block(block, inputs, device, compute_dtype=compute_dtype, replay=replay)
                del replay
                for out in outputs:
                    _check_finite(out, f"the outputs of quantized {block_name}")
                inputs = inputs.for_block(index + 1, outputs)
            _place_back(block, home, device, offloaded)
            if "layerwise_loss" in stats:
                bar.set_postfix(loss=f"{stats['layerwise_loss']:.4g}")
    finally:
        model.train(was_training)
    summary = {
        "blocks": [
            {k: v for k, v in s.items() if k != "layers"} for s in block_stats
        ],
        "mean_layerwise_loss": _mean([s.get("layerwise_loss") for s in block_stats]),
        "seconds": round(time.perf_counter() - t_start, 2),
        "calibration_tokens": int(windows.numel()),
        "original_size_bytes": original_bytes,
        "batch_size": resolved["batch_size"],
        "calibration_dtype": resolved["calibration_dtype"],
        "base_model": str(getattr(model, "name_or_path", "") or "") or None,
    }
    config.quantization_stats = summary
    # The reload rebuilds exactly these (a linear the calibration never reached stays dense, and loads dense).
    config.packed_modules = [name for name, m in model.named_modules() if isinstance(m, DecoupleQLinear)]
    return summary


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict with tied tensors (e.g. embeddings shared with lm_head) counted once, as a
    checkpoint stores them. `keep_vars` returns the parameters themselves, so ties are found by identity (also for
    offloaded weights on the meta device)."""
    sizes = {id(t): t.numel() * t.element_size() for t in model.state_dict(keep_vars=True).values()}
    return sum(sizes.values())


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _is_tokenized(dataset: Any) -> bool:
    if isinstance(dataset, torch.Tensor):
        return True
    if isinstance(dataset, dict) and "input_ids" in dataset:
        return True
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(x, torch.Tensor) for x in dataset):
        return True
    return hasattr(dataset, "keys") and "input_ids" in getattr(dataset, "keys", list)()


def _home_device(block: nn.Module) -> torch.device | None:
    for t in list(block.parameters()) + list(block.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def _place_back(block: nn.Module, home: torch.device | None, device: torch.device, offloaded: bool) -> None:
    """Return the quantized block where the model keeps it. An offloaded block (8x smaller once packed) stays on
    the compute device, with an accelerate hook moving its inputs there."""
    if offloaded:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(block, AlignDevicesHook(execution_device=device, io_same_device=True))
        return
    if home is not None and home != device:
        block.to(home)


def _model_identity(model: nn.Module, num_blocks: int) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "name_or_path": str(getattr(model, "name_or_path", "") or getattr(cfg, "_name_or_path", "")),
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_blocks": num_blocks,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
