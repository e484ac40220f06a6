"""``DecoupleQLinear``: a linear layer whose weight is stored as packed 2/3/4/8-bit codes plus float scales/zeros.

``W[n, k] = scales[k // g, n] * q[n, k] + zeros[k // g, n]``; the packed layout is documented in
:mod:`hf_decoupleq.packing` and ``docs/format.md``. With incoherence processing the codes quantize ``W V^T`` (a
randomized block Hadamard ``V``, :mod:`hf_decoupleq.hadamard`) and the input is rotated first: ``y = (x V^T) W^T``.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
from torch import nn

from ..errors import DecoupleQConfigError
from ..format import storage_bits
from ..hadamard import check_signs, has_transform, inverse_transform, transform_input
from ..kernels import interpreting, reference, triton_available
from ..packing import SUPPORTED_BITS, effective_group_size, num_groups, pack, packed_rows, unpack
from . import functional as F

logger = logging.getLogger(__name__)

__all__ = ["BACKEND_ENV", "DecoupleQLinear", "SharedRotation", "share_rotations"]

BACKEND_ENV = "HF_DECOUPLEQ_BACKEND"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Above this many rows the CPU int4 kernel loses to one dequantized weight + a dense GEMM (prefill, calibration).
_INT4_MAX_M = 1024


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DecoupleQConfigError(f"{name}={value!r} must be a positive int")
    return value


def _requested_backend() -> str:
    """Backend forced by ``HF_DECOUPLEQ_BACKEND`` (``"triton"``, ``"torch"``) or ``"auto"``; read at call time."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value not in ("triton", "torch"):
        raise DecoupleQConfigError(f"{BACKEND_ENV}={value!r} is not allowed; use 'triton', 'torch' or 'auto'")
    return value


def _select_backend(device: torch.device) -> str:
    requested = _requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise DecoupleQConfigError(f"{BACKEND_ENV}=triton but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise DecoupleQConfigError(
                f"{BACKEND_ENV}=triton with tensors on {device.type}: Triton runs on CUDA, or on the CPU only under "
                "TRITON_INTERPRET=1 (set before triton is imported)"
            )
        return "triton"
    return "triton" if device.type == "cuda" and triton_available() else "torch"


class DecoupleQLinear(nn.Module):
    """Linear layer ``y = x W^T + b`` with a decoupleQ-quantized weight.

    Args:
        in_features (`int`): size of each input sample (``K``).
        out_features (`int`): size of each output sample (``N``).
        bits (`int`): code width, one of 2, 3, 4, 8.
        group_size (`int`): columns per (scale, zero) group; ``-1`` means one group per output row (per-channel).
            ``effective_group_size`` holds the group size in columns (``in_features`` for per-channel).
        bias (`bool`, defaults to `True`): whether to hold a ``bias`` buffer.
        dtype (`torch.dtype`, defaults to `torch.float16`): dtype of ``scales``, ``zeros`` and ``bias``.
        device: where to allocate the buffers (``with torch.device("meta"):`` works too).
        incoherence (`bool`, defaults to `False`): hold a ``hadamard_signs`` buffer: the stored weight is in the
            rotated basis ``W V^T`` and ``forward`` rotates ``x`` first (needs an even ``in_features``).

    Buffers (persistent, i.e. in the ``state_dict``; their shapes depend only on the arguments above):
        - ``qweight``: int32 ``[packed_rows(in_features, bits), out_features]``, codes packed along the input dim.
        - ``scales``, ``zeros``: ``dtype`` ``[ceil(in_features / effective_group_size), out_features]``.
        - ``bias``: ``dtype`` ``[out_features]`` (only with ``bias=True``).
        - ``hadamard_signs``: int8 ``[in_features]``, +1/-1 (only with ``incoherence=True``): the signs of
          ``V = blockdiag(H_b, ..., H_b) diag(signs) / sqrt(b)``, ``b`` the largest power of two dividing
          ``in_features`` (at most 4096).

    Forward backends:
        - Triton (x on CUDA and triton installed, or forced with ``HF_DECOUPLEQ_BACKEND=triton``, which on the CPU
          needs ``TRITON_INTERPRET=1``): the fused kernels of :mod:`hf_decoupleq.kernels` through the
          ``torch.ops.hf_decoupleq.matmul`` custom op.
        - PyTorch (everywhere else, or ``HF_DECOUPLEQ_BACKEND=torch``). On the CPU, for bits <= 4, group size
          32/64/128/256 dividing ``in_features``, ``out_features % 16 == 0`` and bfloat16 (``x`` or the module),
          it calls PyTorch's fused int4 CPU kernel on a cached 4-bit repacking of the codes (0.5 byte/weight,
          computed in bfloat16). Otherwise it works from a cached copy of the unpacked uint8 codes (1 byte/weight):
          for up to 16 rows with ``x W^T = sum_g s_g (x_g . q_g) + z_g sum(x_g)`` (batched matmuls over groups on
          cache-sized chunks of columns), for more rows through one dequantized temporary weight and a GEMM.
          No full-precision copy of the weight is ever kept. Caches are
          rebuilt when ``qweight``/``scales``/``zeros`` change (tracked by tensor version), not saved.
        - Gradients: whenever grad mode is on and ``x``, ``scales``, ``zeros`` or ``bias`` require grad, forward
          takes a differentiable PyTorch path (the custom ops have no autograd formula).

    With ``hadamard_signs``, ``x`` is first rotated to ``x V^T`` (a fast Hadamard transform: the Triton kernel of
    :mod:`hf_decoupleq.kernels.hadamard` where the Triton backend runs, otherwise :func:`hf_decoupleq.hadamard.fwht`'s
    Kronecker-factored matmuls, differentiable) and the rotated activations go through the backends above.

    The output has ``x``'s dtype and is accurate to the lower precision of ``x``'s dtype and the module's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        incoherence: bool = False,
    ) -> None:
        super().__init__()
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise DecoupleQConfigError(f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")
        if dtype not in _FLOAT_DTYPES:
            raise DecoupleQConfigError(f"dtype={dtype!r} is not supported; allowed: {_FLOAT_DTYPES}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.effective_group_size = effective_group_size(in_features, group_size)
        n_groups = num_groups(in_features, group_size)
        rows = packed_rows(in_features, bits)
        self.register_buffer("qweight", torch.zeros((rows, out_features), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros((n_groups, out_features), dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros((n_groups, out_features), dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        if incoherence:
            if not has_transform(in_features):
                raise DecoupleQConfigError(
                    f"incoherence=True needs an even in_features (a Hadamard block), got {in_features}"
                )
            self.register_buffer("hadamard_signs", torch.ones(in_features, dtype=torch.int8, device=device))
        else:
            self.hadamard_signs = None
        self._cache: dict[str, Any] = {}
        self._shared_rotation: SharedRotation | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty_like(
        cls,
        linear: nn.Linear,
        bits: int,
        group_size: int,
        dtype: torch.dtype | None = None,
        incoherence: bool = False,
    ) -> DecoupleQLinear:
        """An empty packed layer with ``linear``'s shape, bias, device and (unless given) dtype, ready to be loaded
        (the one place a packed module is shaped after a dense one: reload, resume and :meth:`from_linear`)."""
        return cls(
            linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
            dtype=dtype or linear.weight.dtype, device=linear.weight.device, incoherence=incoherence,
        )  # fmt: skip

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quantized: Any,
        dtype: torch.dtype | None = None,
        hadamard_signs: torch.Tensor | None = None,
    ) -> DecoupleQLinear:
        """Build a packed layer from ``linear`` (for its shape and bias) and a solver result.

        Args:
            linear (`nn.Linear`): the layer that was quantized.
            quantized: any object with ``codes`` (integer ``[out, in]``), ``scales`` and ``zeros`` (``[out, G]``),
                ``bits`` and ``group_size`` (effective, in columns; ``-1`` is accepted for per-channel). Codes of a
                width the packed format lacks (5 bits) are stored in the next wider one (8 bits).
            dtype (`torch.dtype`, *optional*): dtype of scales/zeros/bias; defaults to ``linear.weight.dtype``.
            hadamard_signs (`torch.Tensor`, *optional*): the +-1 signs of the incoherence transform, when the codes
                quantize ``W V^T`` rather than ``W``.
        """
        missing = [a for a in ("codes", "scales", "zeros", "bits", "group_size") if not hasattr(quantized, a)]
        if missing:
            raise DecoupleQConfigError(f"quantized result lacks attributes {missing}")
        n_out, k = linear.out_features, linear.in_features
        codes = quantized.codes
        if tuple(codes.shape) != (n_out, k):
            raise DecoupleQConfigError(f"codes shape {tuple(codes.shape)} != linear weight shape {(n_out, k)}")
        bits, group_size = storage_bits(int(quantized.bits)), int(quantized.group_size)
        n_groups = num_groups(k, group_size)
        for name in ("scales", "zeros"):
            t = getattr(quantized, name)
            if tuple(t.shape) != (n_out, n_groups):
                raise DecoupleQConfigError(f"{name} shape {tuple(t.shape)} != expected [{n_out}, {n_groups}]")
        dtype = dtype or linear.weight.dtype
        device = linear.weight.device
        if hadamard_signs is not None:
            check_signs(hadamard_signs, k)
        module = cls.empty_like(linear, bits, group_size, dtype=dtype, incoherence=hadamard_signs is not None)
        with torch.no_grad():
            if hadamard_signs is not None:
                module.hadamard_signs.copy_(hadamard_signs.to(device=device, dtype=torch.int8))
            module.qweight.copy_(pack(codes.to(device), bits))
            module.scales.copy_(quantized.scales.T.to(device=device, dtype=dtype))
            module.zeros.copy_(quantized.zeros.T.to(device=device, dtype=dtype))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach().to(dtype))
        return module

    def post_init(self) -> None:
        """Check the loaded buffers and prepare the backend (idempotent; call after loading a checkpoint).

        Drops stale caches and, for a bfloat16 module on the CPU, builds the 4-bit repacking that PyTorch's
        int4 CPU kernel uses, so that the first forward does not pay for it.
        """
        if self.qweight.dtype != torch.int32:
            raise DecoupleQConfigError(f"qweight dtype is {self.qweight.dtype}; the packed format needs int32")
        expected = (packed_rows(self.in_features, self.bits), self.out_features)
        if tuple(self.qweight.shape) != expected:
            raise DecoupleQConfigError(f"qweight shape {tuple(self.qweight.shape)} != expected {expected}")
        if self.hadamard_signs is not None:
            if self.hadamard_signs.dtype != torch.int8:
                raise DecoupleQConfigError(f"hadamard_signs dtype is {self.hadamard_signs.dtype}; it must be int8")
            check_signs(self.hadamard_signs, self.in_features)
        self._cache.clear()
        if self.qweight.device.type == "cpu" and self._cpu_int4_ok(self.scales.dtype):
            self._cpu_int4_operands()

    # ------------------------------------------------------------------ properties and helpers
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of ``scales``/``zeros`` (follows ``module.to(dtype)``)."""
        return self.scales.dtype

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"incoherence={self.hadamard_signs is not None}"
        )

    def _key(self, *tensors: torch.Tensor) -> tuple:
        # Identity + in-place version: load_state_dict(assign=True) swaps tensors, copy_() bumps the version.
        return tuple((id(t), t._version, t.device, t.dtype) for t in tensors)

    def _cached(self, name: str, key: tuple, build):
        entry = self._cache.get(name)
        if entry is None or entry[0] != key:
            entry = (key, build())
            self._cache[name] = entry
        return entry[1]

    def _codes_by_group(self) -> torch.Tensor:
        """Unpacked uint8 codes as ``[G, g, out]`` (K zero-padded to ``G * g``); cached, 1 byte/weight."""

        def build():
            return F.codes_by_group(self.qweight, self.bits, self.in_features, self.group_size)

        return self._cached("codes", self._key(self.qweight), build)

    def unpacked_codes(self) -> torch.Tensor:
        """The integer codes as uint8 ``[out_features, in_features]``: a read-only view of a cache (unpacked once per
        ``qweight``), so copy it before changing it."""
        return self._codes_by_group().view(-1, self.out_features)[: self.in_features].T

    _codes = unpacked_codes  # the former private name

    def _cpu_int4_ok(self, compute_dtype: torch.dtype) -> bool:
        return F.cpu_int4_supported(
            self.bits, self.effective_group_size, self.out_features, compute_dtype, self.qweight.device
        )

    def _cpu_int4_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            return F.cpu_int4_operands(
                self.qweight, self.scales, self.zeros, self.bits, self.in_features, self.effective_group_size
            )

        return self._cached("cpu_int4", self._key(self.qweight, self.scales, self.zeros), build)

    # ------------------------------------------------------------------ math
    def dequantize_weight(self) -> torch.Tensor:
        """The dequantized weight ``[out_features, in_features]`` in the module dtype (Triton kernel on CUDA).

        Always in the original basis: for an incoherent layer this is ``W_hat V`` (rotated back in float32), so a
        plain ``nn.Linear`` holding it computes what this module computes.
        """
        args = (self.qweight, self.scales, self.zeros, self.bits, self.effective_group_size, self.in_features)
        if _select_backend(self.qweight.device) == "triton":
            w = torch.ops.hf_decoupleq.dequantize(*args)
        else:
            w = reference.dequantize(*args)
        if self.hadamard_signs is not None:
            w = inverse_transform(w.float(), self.hadamard_signs).to(w.dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` ``[..., in_features]`` (fp16/bf16/fp32, any strides); output in ``x.dtype``.

        Uses the differentiable PyTorch path whenever a gradient is needed (see the class docstring).
        """
        if x.shape[-1] != self.in_features:
            raise DecoupleQConfigError(f"x has last dimension {x.shape[-1]}, expected in_features={self.in_features}")
        if x.dtype not in _FLOAT_DTYPES:
            raise DecoupleQConfigError(f"x dtype {x.dtype} is not supported; allowed: {_FLOAT_DTYPES}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        g = self.effective_group_size
        compiling = torch.compiler.is_compiling()
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or self.scales.requires_grad
            or self.zeros.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        )
        if self.hadamard_signs is not None:
            x2 = self._rotate(x, x2, needs_grad)
        if needs_grad:
            # Under torch.compile the codes are unpacked in the graph: the Python-side cache would break it.
            codes = unpack(self.qweight, self.bits, self.in_features) if compiling else self.unpacked_codes()
            w = reference.dequantize_codes(codes, self.scales, self.zeros, g, dtype=x.dtype)
            y = x2 @ w.T
        elif _select_backend(x.device) == "triton":
            y = torch.ops.hf_decoupleq.matmul(
                x2, self.qweight, self.scales, self.zeros, self.bits, g, self.in_features
            )
        elif compiling:
            # Pure tensor code that Inductor fuses (unpack + dequantize + matmul); no Python-side caches.
            w = reference.dequantize(self.qweight, self.scales, self.zeros, self.bits, g, self.in_features, x.dtype)
            y = x2 @ w.T
        else:
            y = self._forward_torch(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _rotate(self, x: torch.Tensor, x2: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        """``x V^T`` (incoherence): the Triton kernel on the Triton backend, the differentiable torch FWHT else.

        Layers that share a rotation (:func:`share_rotations`) and read the same input tensor ``x`` rotate it once:
        the first computes ``x V^T`` and the others reuse it (only without autograd and outside torch.compile)."""
        shared = self._shared_rotation
        if shared is not None and not needs_grad and not torch.compiler.is_compiling():
            cached = shared.lookup(x)
            if cached is not None:
                return cached
        if not needs_grad and _select_backend(x2.device) == "triton":
            rotated = torch.ops.hf_decoupleq.hadamard(x2, self.hadamard_signs)
        else:
            rotated = transform_input(x2, self.hadamard_signs)
        if shared is not None and not needs_grad and not torch.compiler.is_compiling():
            shared.store(x, rotated)
        return rotated

    def _forward_torch(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cpu" and x2.shape[0] <= _INT4_MAX_M and self._cpu_int4_ok(
            torch.bfloat16 if torch.bfloat16 in (x2.dtype, self.dtype) else x2.dtype
        ):
            packed, scale_zero = self._cpu_int4_operands()
            return F.cpu_int4_matmul(x2, packed, scale_zero, self.effective_group_size)
        if x2.shape[0] > F.GROUPED_MAX_M:
            # Many rows: one dequantized temporary weight and a single GEMM (compute-bound anyway).
            w = reference.dequantize_codes(
                self.unpacked_codes(), self.scales, self.zeros, self.effective_group_size, x2.dtype
            )
            return x2 @ w.T
        return self._grouped_matmul(x2)

    def _grouped_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x W^T`` for few rows without a full-size temporary (:func:`hf_decoupleq.nn.functional.grouped_matmul`)."""
        return F.grouped_matmul(x2, self._codes_by_group(), self.scales, self.zeros, self.in_features)


class SharedRotation:
    """The rotated copy ``x V^T`` of the last input seen by a set of layers with the same signs ``V``.

    Linears that read one tensor (q/k/v, gate/up) share one rotation in format-3 checkpoints. The first of them to
    run stores ``x V^T`` here, keyed by the identity and in-place version of ``x`` (a weak reference, so a freed
    input never matches a new tensor at the same address); the others reuse it. The entry is dropped once every
    member has used it, so no rotated activation outlives the layers that need it.
    """

    def __init__(self, members: int) -> None:
        self.members = members
        self._ref: weakref.ref | None = None
        self._version = -1
        self._value: torch.Tensor | None = None
        self._uses = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"members": self.members}  # pickles and deep copies start empty (no weak reference, no tensor)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["members"])

    @staticmethod
    def _version_of(x: torch.Tensor) -> int:
        # Inference-mode tensors have no version counter; nothing in a forward pass writes into a linear's input
        # between the sibling layers that read it, and the identity check still applies.
        return -2 if x.is_inference() else x._version

    def lookup(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._ref is None or self._ref() is not x or self._version != self._version_of(x):
            return None
        value = self._value
        self._uses += 1
        if self._uses >= self.members:
            self.clear()
        return value

    def store(self, x: torch.Tensor, value: torch.Tensor) -> None:
        self.clear()
        if self.members > 1:
            self._ref, self._version, self._value, self._uses = weakref.ref(x), self._version_of(x), value, 1

    def clear(self) -> None:
        self._ref, self._value, self._uses = None, None, 0


def share_rotations(model: nn.Module) -> int:
    """Let the rotated layers of ``model`` that share a parent module and identical signs rotate their common input
    once (see :class:`SharedRotation`). Returns the number of groups of two or more layers.

    Sharing is an optimization only: a layer whose input differs from the cached one rotates its own input, so a
    grouping that is wrong (or a format-2 checkpoint, whose signs are per layer and so never group) stays correct.
    """
    groups: dict[tuple, list[DecoupleQLinear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, DecoupleQLinear) and module.hadamard_signs is not None:
            module._shared_rotation = None
            signs = module.hadamard_signs
            if signs.device.type == "meta":
                continue
            parent = name.rpartition(".")[0]
            key = (parent, signs.device, signs.shape[0], signs.cpu().numpy().tobytes())
            groups.setdefault(key, []).append(module)
    shared = 0
    for members in groups.values():
        if len(members) > 1:
            rotation = SharedRotation(len(members))
            for module in members:
                module._shared_rotation = rotation
            shared += 1
    return shared
