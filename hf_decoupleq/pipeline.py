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

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import DecoupleQConfig
from .errors import DecoupleQError, DecoupleQNumericalError, UnsupportedModelError
from .integration import find_decoder_blocks, find_linears, set_submodule
from .nn.linear import DecoupleQLinear
from .resume import ResumeStore
from .solver import FakeQuantLinear, HessianAccumulator, refine_block, solve_layer

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been captured."""


@dataclass
class BlockInputs:
    """Calibration inputs of one decoder block: hidden states per batch (CPU) and the keyword arguments the model
    passes to its blocks (deduplicated: batches of equal shape share one dict)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    _on_device: dict[int, dict[str, Any]] = field(default_factory=dict)

    def kwargs_on(self, index: int, device: torch.device) -> dict[str, Any]:
        key = id(self.kwargs[index])
        if key not in self._on_device:
            self._on_device[key] = _to_device(self.kwargs[index], device)
        return self._on_device[key]


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


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model on the calibration windows up to the first decoder block and keep that block's inputs."""
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            h = args[0]
        else:
            h = kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        kwargs = _to_device(kwargs, torch.device("cpu"))
        hidden.append(h.detach().to("cpu"))
        if kwargs_list and _same(kwargs_list[-1], kwargs):
            kwargs_list.append(kwargs_list[-1])
        else:
            kwargs_list.append(kwargs)
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = _input_device(model)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(hidden) != (windows.shape[0] + batch_size - 1) // batch_size:
        raise UnsupportedModelError(
            "the model's forward did not reach its first decoder block; hf-decoupleq cannot calibrate it"
        )
    return BlockInputs(hidden, kwargs_list)


@torch.no_grad()
def _forward_all(block: nn.Module, inputs: BlockInputs, device: torch.device, keep: bool = True) -> list[torch.Tensor]:
    outputs = []
    for i, h in enumerate(inputs.hidden):
        try:
            out = _block_output(block(h.to(device), **inputs.kwargs_on(i, device)))
        except StopForward:
            continue
        if keep:
            outputs.append(out.detach().to("cpu"))
    return outputs


@torch.no_grad()
def discover_sequential_groups(
    block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs, device: torch.device
) -> list[list[str]]:
    """Trace one forward and group linears that read the very same input tensor, in call order.

    For Llama this yields `[[q, k, v], [o], [gate, up], [down]]`; for OPT `[[q, k, v], [out], [fc1], [fc2]]`.
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
        block(inputs.hidden[0].to(device), **inputs.kwargs_on(0, device))
    finally:
        for h in handles:
            h.remove()
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
        logger.warning("linears %s were not called by the block's forward; they are left unquantized", never_called)
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
        outputs = _forward_all(block, inputs, device, keep=keep_outputs)
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
) -> dict[str, Any]:
    """Quantize one decoder block in place (its linears become `DecoupleQLinear`). Returns per-block statistics."""
    t0 = time.perf_counter()
    linears = find_linears(block, f"{block_name}.", skip)
    stats: dict[str, Any] = {"index": block_index, "layers": {}}
    if not linears:
        return stats
    for name, linear in linears.items():
        _check_finite(linear.weight, f"the weight of {block_name}.{name}")
    groups = discover_sequential_groups(block, linears, inputs, device)
    solve_kwargs = _solve_kwargs(config)
    fake: dict[str, FakeQuantLinear] = {}
    originals: dict[str, nn.Linear] = {}

    def solve_group(group: Sequence[str], accs: dict[str, HessianAccumulator]) -> None:
        H = accs[group[0]].hessian()
        for name in group:
            linear = linears[name]
            result = solve_layer(linear.weight.detach().to(device), H, name=f"{block_name}.{name}", **solve_kwargs)
            bias = None if linear.bias is None else linear.bias.detach().to(device=device, dtype=torch.float32)
            fq = FakeQuantLinear.from_result(result, bias=bias)
            originals[name] = linear
            fake[name] = fq
            set_submodule(block, name, fq)
            mean_loss = float(result.loss.mean())
            stats["layers"][name] = mean_loss
            logger.info("%s.%s: %s proxy loss %.6g", block_name, name, config.method, mean_loss)

    # Pass 1: full-precision outputs (block-wise targets) + the first sub-group's Hessian (or every sub-group's).
    first_groups = groups[:1] if config.true_sequential else groups
    need_targets = config.blockwise and config.blockwise_epochs > 0
    # Without targets to keep, the first pass can stop as soon as the first sub-group has seen its input.
    stop_first = None if (need_targets or not config.true_sequential) else groups[0][-1]
    accs, targets = _collect_hessians(
        block, linears, first_groups, inputs, device, block_name=block_name, keep_outputs=need_targets,
        stop_after=stop_first,
    )
    for group in first_groups:
        solve_group(group, accs)
    if config.true_sequential:
        for group in groups[1:]:
            live = {n: fake.get(n, linears[n]) for n in linears}
            live.update({n: linears[n] for n in group})
            accs, _ = _collect_hessians(
                block, live, [group], inputs, device, block_name=block_name, keep_outputs=False, stop_after=group[-1]
            )
            solve_group(group, accs)
    stats["layerwise_loss"] = sum(stats["layers"].values()) / max(len(stats["layers"]), 1)

    if need_targets:
        orig_dtype = next(block.parameters()).dtype
        block.float()
        result = refine_block(
            block,
            inputs.hidden,
            targets,
            [inputs.kwargs_on(i, device) for i in range(len(inputs.hidden))],
            lr=config.blockwise_lr,
            epochs=config.blockwise_epochs,
            weight_decay=config.blockwise_weight_decay,
            train_norms=config.train_norms,
            seed=config.seed + block_index,
        )
        block.to(orig_dtype)
        stats["blockwise_initial_mse"] = result.initial_loss
        stats["blockwise_final_mse"] = result.final_loss
        logger.info(
            "%s: block-wise MSE %.6g -> %.6g", block_name, result.initial_loss, result.final_loss
        )
        del targets

    for name, fq in fake.items():
        original = originals[name]
        packed = DecoupleQLinear.from_linear(original, fq.to_result(), dtype=original.weight.dtype)
        if fq.bias is not None and original.bias is not None:
            packed.bias.copy_(fq.bias.detach().to(packed.bias.dtype))
        set_submodule(block, name, packed.to(device))
    stats["seconds"] = time.perf_counter() - t0
    return stats


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

    t_start = time.perf_counter()
    original_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    prefix, blocks = find_decoder_blocks(model)
    skip = config.effective_modules_to_not_convert
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
    store = None
    if config.checkpoint_dir is not None:
        store = ResumeStore(
            config.checkpoint_dir,
            fingerprint=config.result_fingerprint(),
            model_id=_model_identity(model, len(blocks)),
        )
    was_training = model.training
    model.eval()
    block_stats: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks[0], windows, config.batch_size)
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
            if store is not None and store.has(index):
                store.load_block(index, block, bits=config.bits, group_size=config.group_size)
                stats = store.stats(index)
                logger.info("%s: restored from %s", block_name, config.checkpoint_dir)
            else:
                stats = quantize_block(
                    block, inputs, config, block_name=block_name, block_index=index, skip=skip, device=device
                )
                if store is not None:
                    store.save_block(index, block, stats)
            block_stats.append(stats)
            if index + 1 < len(blocks):
                outputs = _forward_all(block, inputs, device)
                for out in outputs:
                    _check_finite(out, f"the outputs of quantized {block_name}")
                inputs = BlockInputs(outputs, inputs.kwargs)
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
        "base_model": str(getattr(model, "name_or_path", "") or "") or None,
    }
    config.quantization_stats = summary
    return summary


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
