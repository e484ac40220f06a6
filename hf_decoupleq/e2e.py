"""The end-to-end stage: after every block is quantized, train the floating-point parts of the whole model so that its
next-token distribution matches the full-precision model's on the calibration windows.

The integer codes stay frozen (as in EfficientQAT's E2E-QP stage): only each packed linear's ``scales`` and
``zeros``, and optionally the norm weights, change. The result is the same packed format with the same tensors, so it
costs nothing at inference and every checkpoint guarantee holds.

The teacher is captured before any block is quantized: the decoder's last hidden states for every calibration window
(one forward pass of the full-precision model). Teacher logits are recomputed from them with the model's own output
head at each step, so nothing of vocabulary size is stored. The loss is ``KL(teacher || student)`` per token over
the head's outputs, averaged over tokens.

The stage never makes the model worse on what it can measure: it evaluates the loss on a few calibration windows
before and after training, and keeps the trained values only if the loss went down.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .nn.linear import DecoupleQLinear

logger = logging.getLogger(__name__)

__all__ = ["Teacher", "capture_teacher", "end_to_end_supported", "train_end_to_end"]


@dataclass
class Teacher:
    """The full-precision decoder's last hidden states, one tensor ``[batch, seq, hidden]`` per window batch."""

    hidden: list[torch.Tensor]
    batch_size: int


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, output head)`` of a causal LM, or None where they cannot be told apart."""
    get_head = getattr(model, "get_output_embeddings", None)
    get_decoder = getattr(model, "get_decoder", None)
    if get_head is None or get_decoder is None:
        return None
    head = get_head()
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if head is None or decoder is None or decoder is model:
        return None
    return decoder, head


def end_to_end_supported(model: nn.Module) -> str | None:
    """None if the stage can run on ``model``; else the reason it cannot (logged by the caller)."""
    if _parts(model) is None:
        return "the model has no separate decoder and output head (get_decoder / get_output_embeddings)"
    for p in model.parameters():
        if p.device.type == "meta":
            return "part of the model is offloaded (meta parameters); the stage needs every weight in memory"
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _decode(decoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def capture_teacher(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int,
    compute_dtype: torch.dtype | None,
    device: torch.device,
) -> Teacher:
    """Run the full-precision model over the calibration windows; keep the decoder's last hidden states.

    Stored in ``compute_dtype`` when one is set (bfloat16 autocast), else in the model's dtype, on the CPU: for
    SmolLM2-135M and 128 windows of 512 tokens that is 75 MB in bfloat16.
    """
    decoder, _ = _parts(model)
    was_training = model.training
    model.eval()
    hidden = []
    try:
        for batch in windows.split(batch_size):
            with _autocast(device, compute_dtype):
                h = _decode(decoder, batch.to(device))
            hidden.append(h.to(device="cpu", dtype=compute_dtype or h.dtype))
    finally:
        model.train(was_training)
    return Teacher(hidden=hidden, batch_size=batch_size)


class _KLFromLogits(torch.autograd.Function):
    """``sum over tokens of KL(softmax(teacher) || softmax(student))`` from two logit tensors ``[tokens, vocab]``.

    Computed in float32; the gradient with respect to the student logits, ``softmax(student) - softmax(teacher)``,
    is formed in the forward pass and kept in the logits' dtype, so nothing else of vocabulary size outlives the
    call (autograd's own graph would keep both log-softmaxes in float32 and recompute exponentials backwards)."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
        p_t = log_p_t.exp()
        log_p_s = F.log_softmax(student_logits.float(), dim=-1)
        log_p_t.sub_(log_p_s)
        loss = torch.dot(p_t.view(-1), log_p_t.view(-1))
        del log_p_t
        grad = log_p_s.exp_().sub_(p_t)
        ctx.save_for_backward(grad.to(student_logits.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None


def _cast_head(head: nn.Module, compute_dtype: torch.dtype | None):
    """``head`` itself, or for a linear head under autocast a function computing what autocast would (the weight in
    ``compute_dtype``) from a copy cast once: the head is frozen, and autocast casts a frozen weight at every call
    (for SmolLM2-135M, 28M values twice per step)."""
    if compute_dtype is None or type(head) is not nn.Linear or head.weight.dtype == compute_dtype:
        return head
    weight = head.weight.detach().to(compute_dtype)
    bias = None if head.bias is None else head.bias.detach().to(compute_dtype)
    return lambda x: F.linear(x.to(compute_dtype), weight, bias)


def _kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: Callable, chunk: int = 1024) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(head(t)) || softmax(head(s)))``, in float32, ``chunk`` tokens at a time."""
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(s.device)
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk):
        with torch.no_grad():
            teacher_logits = head(t[start : start + chunk].to(s.dtype))
        total = total + _KLFromLogits.apply(head(s[start : start + chunk]), teacher_logits)
    return total / s.shape[0]


def _window_batches(teacher: Teacher, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids [1, T], teacher hidden [1, T, H])`` per calibration window, in window order."""
    out = []
    for b, ids in enumerate(windows.split(teacher.batch_size)):
        for i in range(ids.shape[0]):
            out.append((ids[i : i + 1], teacher.hidden[b][i : i + 1]))
    return out


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


class _Trainable:
    """The float parts as float32 training copies; ``restore`` or ``commit`` puts plain buffers back."""

    def __init__(self, model: nn.Module, train_norms: bool) -> None:
        self.model = model
        self.flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.packed = [m for m in model.modules() if isinstance(m, DecoupleQLinear)]
        self.buffers: list[tuple[DecoupleQLinear, str, torch.Tensor]] = []
        self.quant_params: list[nn.Parameter] = []
        for m in self.packed:
            for name in ("scales", "zeros"):
                original = getattr(m, name)
                param = nn.Parameter(original.detach().float().clone())
                self.buffers.append((m, name, original))
                delattr(m, name)
                setattr(m, name, param)  # a Parameter attribute registers as a parameter
                self.quant_params.append(param)
        self.norms: list[tuple[nn.Parameter, torch.Tensor]] = []
        if train_norms:
            for module in model.modules():
                if _is_norm(module):
                    for p in module.parameters(recurse=False):
                        self.norms.append((p, p.detach().clone()))
                        p.data = p.data.float()
                        p.requires_grad_(True)

    @property
    def norm_params(self) -> list[nn.Parameter]:
        return [p for p, _ in self.norms]

    def _finish(self, keep: bool) -> None:
        for m, name, original in self.buffers:
            trained = getattr(m, name)
            delattr(m, name)
            value = trained.detach().to(original.dtype) if keep else original
            m.register_buffer(name, value)
        for p, original in self.norms:
            p.data = p.data.to(original.dtype) if keep else original
        for p, flag in self.flags.items():
            p.requires_grad_(flag)
        for m in self.packed:
            m.post_init()

    def commit(self) -> None:
        self._finish(keep=True)

    def restore(self) -> None:
        self._finish(keep=False)

    def revert(self) -> None:
        """After ``commit``: put the values from before training back."""
        for m, name, original in self.buffers:
            m.register_buffer(name, original)
        for p, original in self.norms:
            p.data = original
        for m in self.packed:
            m.post_init()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _mean_loss(decoder, head, pairs, device, compute_dtype) -> float:
    total = 0.0
    for ids, t in pairs:
        with _autocast(device, compute_dtype):
            total += float(_kl(_decode(decoder, ids.to(device)), t, head))
    return total / max(len(pairs), 1)


def train_end_to_end(
    model: nn.Module,
    windows: torch.Tensor,
    teacher: Teacher,
    *,
    epochs: float,
    lr: float,
    norm_lr: float,
    train_norms: bool,
    compute_dtype: torch.dtype | None,
    device: torch.device,
    seed: int,
    check_windows: int = 16,
    relative: bool = False,
) -> dict[str, Any]:
    """Train scales, zeros (and norms) of the quantized ``model`` in place against ``teacher``; return statistics.

    One Adam step per calibration window, windows in a seeded random order, ``epochs`` passes (fractions allowed),
    cosine decay after a 5% warm-up. ``check_windows`` windows (every k-th) measure the loss before and after; the
    trained values are kept only if it went down. ``relative=True`` (the pipeline's setting) gives each packed layer
    its own step size, ``lr`` times the mean magnitude of its scales, and each norm weight ``norm_lr`` times its mean
    magnitude (at least 0.01); ``relative=False`` uses ``lr`` and ``norm_lr`` themselves.
    """
    t0 = time.perf_counter()
    decoder, head = _parts(model)
    if compute_dtype is None:
        # A half-precision model trains float32 copies of its float parts under autocast to its own dtype.
        dtype = next(iter(head.parameters())).dtype
        compute_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
    head = _cast_head(head, compute_dtype)
    pairs = _window_batches(teacher, windows)
    stride = max(len(pairs) // max(check_windows, 1), 1)
    check = pairs[::stride][:check_windows]
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    before = _mean_loss(decoder, head, check, device, compute_dtype)
    trainable = _Trainable(model, train_norms)
    total = max(round(epochs * len(pairs)), 1)
    warmup = max(total // 20, 1)
    if relative:
        # A layer's step is ``lr`` times the mean magnitude of its scales: scales of 2-, 3- and 4-bit layers differ
        # by their number of levels, and layers of one model by an order of magnitude.
        groups = [
            {"params": [scales, zeros], "lr": lr * float(scales.detach().abs().mean())}
            for scales, zeros in zip(trainable.quant_params[0::2], trainable.quant_params[1::2])
        ]
    else:
        groups = [{"params": trainable.quant_params, "lr": lr}]
    if trainable.norms and relative:
        # Likewise each norm weight steps by ``norm_lr`` times its own mean magnitude (norms of one model differ
        # widely in size); at least 0.01 of it, so that a norm stored as an offset from 1 (Gemma's) still trains.
        groups += [
            {"params": [p], "lr": norm_lr * max(float(p.detach().abs().mean()), 1e-2)} for p in trainable.norm_params
        ]
    elif trainable.norms:
        groups.append({"params": trainable.norm_params, "lr": norm_lr})
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.95))
    base = [g["lr"] for g in groups]
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    running = []
    try:
        for step in range(total):
            if not order:
                order = torch.randperm(len(pairs), generator=generator).tolist()
            ids, t = pairs[order.pop()]
            factor = _lr_factor(step, total, warmup)
            for g, b in zip(optimizer.param_groups, base):
                g["lr"] = b * factor
            with _autocast(device, compute_dtype):
                loss = _kl(_decode(decoder, ids.to(device)), t, head)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running.append(float(loss.detach()))
            if (step + 1) % max(total // 10, 1) == 0:
                logger.info(
                    "end-to-end stage: step %d/%d, KL %.5f (mean of the last %d)", step + 1, total,
                    sum(running) / len(running), len(running),
                )  # fmt: skip
                running = []
        trainable.commit()
    except BaseException:
        trainable.restore()
        model.train(was_training)
        raise
    after = _mean_loss(decoder, head, check, device, compute_dtype)
    kept = after < before
    if not kept:
        trainable.revert()  # the trained values did worse on the check windows: back to the block-wise ones
    model.train(was_training)
    seconds = time.perf_counter() - t0
    logger.info(
        "end-to-end stage: %d steps in %.0f s; KL on %d check windows %.5f -> %.5f (%s)", total, seconds, len(check),
        before, after, "kept" if kept else "worse: reverted to the block-wise values",
    )  # fmt: skip
    return {"steps": total, "kl_before": before, "kl_after": after, "kept": kept, "seconds": seconds}
