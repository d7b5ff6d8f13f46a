"""The fused CPU kernel of the spline layers (``splinekernel.c``): one pass per direction.

A spline layer's elementwise work (softmax of the bin sizes, knots, bin search, the rational-
quadratic map, tails, log-det) is some forty torch ops forward and twice that backward, each a pass
over a small tensor and a dispatch; with batch 256 that overhead, not arithmetic, is what a training
step's time went to. ``splinekernel.c`` does all of it per element in one loop, forward and
backward (vector-Jacobian products for the inputs and the raw parameters), in the storage's
precision as the torch code (float32 lanes are twice as many per vector as float64 ones). When a
gradient will be needed, the forward pass keeps what the backward one needs (softmaxes, the chosen
bin, its knots and slopes) in a cache tensor, so that the backward pass does only the derivative
arithmetic; sampling without gradients keeps nothing.
:meth:`SplineSettings.apply <boltzgen.flows.transforms.SplineSettings.apply>` uses it for CPU
tensors in float32 or float64 and keeps its torch code as the reference, the CUDA path and the
fallback (no C compiler, or ``BOLTZGEN_NATIVE=0``). It supports first derivatives only.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from boltzgen import native_build

SOURCE = Path(__file__).with_name("splinekernel.c")
#: The most bins the kernel takes (its lane buffers' size); more run on the torch code.
MAX_BINS = 32
# Tried in order, the first that builds wins: with glibc's vector exp and log, without them, portable.
_VARIANTS = [(["-march=native", "-DRQS_LIBMVEC"], ["-lmvec", "-lm"]), (["-march=native"], ["-lm"]), ([], ["-lm"])]

_library: ctypes.CDLL | None = None
_reason: str | None = None


class SplineStruct(ctypes.Structure):
    """Mirror of ``settings_t`` in splinekernel.c (field order and types must match)."""

    _fields_ = [("K", ctypes.c_int64), ("tail", ctypes.c_double), ("min_w", ctypes.c_double),
                ("min_h", ctypes.c_double), ("min_d", ctypes.c_double), ("offset", ctypes.c_double)]


def _declare(library: ctypes.CDLL) -> None:
    common = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(SplineStruct),
              ctypes.c_int, ctypes.c_int]
    library.rqs_forward.argtypes = common + [ctypes.c_void_p] * 5
    library.rqs_backward.argtypes = common + [ctypes.c_void_p] * 6
    library.rqs_forward.restype = library.rqs_backward.restype = ctypes.c_int
    library.rqs_cache_len.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    library.rqs_cache_len.restype = ctypes.c_int64


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it is disabled or cannot be built (the reason: :data:`_reason`)."""
    global _library, _reason
    _library, _reason = native_build.load_once(_library, _reason, SOURCE, _VARIANTS, _declare, "spline",
                                               "spline layers run in eager torch, several times slower on a CPU")
    return _library


def usable(values: Tensor, params: Tensor, bins: int) -> bool:
    """Whether the kernel takes these tensors (CPU, both float32 or both float64) and ``bins``, and is built."""
    return (values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)
            and params.dtype == values.dtype and 2 <= bins <= MAX_BINS and load_kernel() is not None)


def _call(name: str, rows: int, n: int, n_lin: int, p: int, settings: SplineStruct, inverse: bool,
          *tensors: Tensor | None) -> None:
    library = load_kernel()
    assert library is not None
    double = int(next(t for t in tensors if t is not None).dtype == torch.float64)
    status = getattr(library, name)(rows, n, n_lin, p, ctypes.byref(settings), int(inverse), double,
                                    *(None if t is None else t.data_ptr() for t in tensors))
    if status != 0:
        raise ValueError(f"the spline kernel supports 2 to {MAX_BINS} bins, got {settings.K}")


class _FusedSpline(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, params: Tensor, n_lin: int, settings: SplineStruct,  # type: ignore[override]
                inverse: bool, keep: bool) -> tuple[Tensor, Tensor]:
        values, params = values.contiguous(), params.contiguous()
        rows, n = values.shape
        out, logdet = torch.empty_like(values), values.new_empty(rows)
        # What the backward pass needs of the forward one, in the kernel's lane-block layout; only
        # where a gradient will be asked for (not when sampling).
        cache = None
        if keep:
            library = load_kernel()
            assert library is not None
            cache = values.new_empty(library.rqs_cache_len(rows, n, settings.K, int(values.dtype == torch.float64)))
        _call("rqs_forward", rows, n, n_lin, params.shape[1], settings, inverse, values, params, out, logdet, cache)
        ctx.save_for_backward(values, cache)
        ctx.n_lin, ctx.settings, ctx.inverse, ctx.n_params = n_lin, settings, inverse, params.shape[1]
        return out, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor | None, grad_logdet: Tensor | None  # type: ignore[override]
                 ) -> tuple[Tensor, Tensor, None, None, None, None]:
        values, cache = ctx.saved_tensors
        if cache is None:
            raise RuntimeError("the spline kernel kept nothing for a backward pass: its inputs did not require grad")
        grad_out = torch.zeros_like(values) if grad_out is None else grad_out.contiguous()
        grad_logdet = values.new_zeros(values.shape[0]) if grad_logdet is None else grad_logdet.contiguous()
        grad_values, grad_params = torch.empty_like(values), values.new_empty(values.shape[0], ctx.n_params)
        _call("rqs_backward", values.shape[0], values.shape[1], ctx.n_lin, ctx.n_params, ctx.settings, ctx.inverse,
              values, cache, grad_out, grad_logdet, grad_values, grad_params)
        return grad_values, grad_params, None, None, None, None


def fused_spline(values: Tensor, params: Tensor, n_lin: int, bins: int, tail_bound: float, min_bin_width: float,
                 min_bin_height: float, min_derivative: float, inverse: bool) -> tuple[Tensor, Tensor]:
    """The spline of :class:`~boltzgen.flows.transforms.SplineSettings` on ``values`` ``[batch, n]``:
    the first ``n_lin`` dims linear, the rest circular, with raw ``params`` ``[batch, n_lin (3 bins - 1)
    + (n - n_lin) 3 bins]``. Returns the outputs ``[batch, n]`` and the summed log-slopes ``[batch]``."""
    offset = math.log(math.expm1(1.0 - min_derivative))
    settings = SplineStruct(bins, tail_bound, min_bin_width, min_bin_height, min_derivative, offset)
    keep = torch.is_grad_enabled() and (values.requires_grad or params.requires_grad)
    return _FusedSpline.apply(values, params, n_lin, settings, inverse, keep)
