"""The fused CPU kernel of the torch force field (``ffkernel.c``), compiled at first use.

Eager torch pays a pass over memory and a dispatch per op, so on a CPU the force field is bound by
memory traffic, not arithmetic. ``ffkernel.c`` evaluates bonds, angles, torsions, the non-bonded
pairs and OBC of a block of configurations in one pass, in float64, with the same formulas as
:mod:`boltzgen.energies.eager` (which stays the reference and the CUDA path).

The source is compiled by :mod:`boltzgen.native_build` (the system C compiler, a per-user cache keyed
by the source, the flags and the CPU) and called through ctypes. Without a compiler, or with ``BOLTZGEN_NATIVE=0``, :func:`load_kernel`
returns ``None`` and the force field runs in eager torch; the reason is in :func:`unavailable_reason`,
and a failed build also warns once (eager torch is 15-25x slower).

Batches are split over ``torch.get_num_threads()`` threads at whole kernel blocks, so the number of
threads changes no bit of the result. The threads are the kernel's own (a pthread pool in
ffkernel.c; ctypes releases the GIL for the call).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from boltzgen import native_build

SOURCE = Path(__file__).with_name("ffkernel.c")
# Tried in order, the first that builds wins: this CPU's vector units with glibc's vector atan2,
# without it, and a portable build.
_VARIANTS = [
    (["-march=native", "-DFF_LIBMVEC"], ["-lmvec", "-lm"]),
    (["-march=native"], ["-lm"]),
    ([], ["-lm"]),
]
# Fewer configurations per thread than this are not worth a second thread.
_MIN_PER_THREAD = 128

_i64p = ctypes.POINTER(ctypes.c_int64)
_f64p = ctypes.POINTER(ctypes.c_double)


class FFParams(ctypes.Structure):
    """Mirror of ``ff_params`` in ffkernel.c (field order and types must match)."""

    _fields_ = [
        ("n_atoms", ctypes.c_int64),
        ("n_bonds", ctypes.c_int64), ("bond_idx", _i64p), ("bond_r0", _f64p), ("bond_k", _f64p),
        ("n_angles", ctypes.c_int64), ("angle_idx", _i64p), ("angle_theta0", _f64p), ("angle_k", _f64p),
        ("n_torsions", ctypes.c_int64), ("torsion_idx", _i64p), ("n_cos", ctypes.c_int64),
        ("n_sin", ctypes.c_int64), ("cos_coef", _f64p), ("sin_coef", _f64p),
        ("n_pairs", ctypes.c_int64), ("pair_idx", _i64p), ("pair_qq", _f64p), ("pair_c12", _f64p),
        ("pair_c6", _f64p),
        ("obc_rho", _f64p), ("obc_scaled", _f64p), ("obc_half_rho", _f64p), ("obc_inv_rho", _f64p),
        ("obc_inv_radius", _f64p), ("obc_self", _f64p), ("obc_ace", _f64p), ("obc_pair_qq", _f64p),
    ]


_library: ctypes.CDLL | None = None
_reason: str | None = None


def _declare(library: ctypes.CDLL) -> None:
    # Arrays are passed as addresses (ints from Tensor.data_ptr()): cheaper than casting pointers.
    library.ff_energy_grad_threads.argtypes = [ctypes.POINTER(FFParams), ctypes.c_int64, ctypes.c_double,
                                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    library.ff_energy_grad_threads.restype = ctypes.c_int


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it is disabled or cannot be built (see :func:`unavailable_reason`)."""
    global _library, _reason
    _library, _reason = native_build.load_once(_library, _reason, SOURCE, _VARIANTS, _declare, "force-field",
                                               "the torch energy runs in eager torch, 15-25x slower")
    return _library


def unavailable_reason() -> str | None:
    """Why :func:`load_kernel` returned None (None when the kernel is loaded or not tried yet)."""
    return _reason


def _ptr(array: np.ndarray, kind: type) -> ctypes._Pointer:  # type: ignore[type-arg]
    return array.ctypes.data_as(ctypes.POINTER(kind))


class KernelParameters:
    """The force-field parameters in the layout ``ff_params`` points into (arrays kept alive here).

    Index arrays are ``[k, rows]`` int64 (k = 2, 3, 4 atoms per row). Torsion coefficients are
    ``[n_cos, n_torsions]`` and ``[n_sin, n_torsions]``. ``pair_idx`` is the pair list shared by
    ``nonbonded`` (``qq, c12, c6``, each ``[pairs]``) and ``gbsa_obc`` (``rho, scaled``, each ``[2, pairs]``;
    ``half_rho, inv_rho, inv_radius, self, ace``, each ``[n_atoms]``; ``pair_qq`` ``[pairs]``), as in
    ffkernel.c. Every other parameter is ``[rows]`` float64. Missing terms are ``None``.
    """

    def __init__(self, n_atoms: int, *, bonds: tuple[np.ndarray, ...] | None = None,
                 angles: tuple[np.ndarray, ...] | None = None, torsions: tuple[np.ndarray, ...] | None = None,
                 pair_idx: np.ndarray | None = None, nonbonded: tuple[np.ndarray, ...] | None = None,
                 gbsa_obc: tuple[np.ndarray, ...] | None = None) -> None:
        keep: list[np.ndarray] = []

        def f64(a: np.ndarray) -> ctypes._Pointer:  # type: ignore[type-arg]
            keep.append(np.ascontiguousarray(a, dtype=np.float64))
            return _ptr(keep[-1], ctypes.c_double)

        def i64(a: np.ndarray) -> ctypes._Pointer:  # type: ignore[type-arg]
            keep.append(np.ascontiguousarray(a, dtype=np.int64))
            return _ptr(keep[-1], ctypes.c_int64)

        p = FFParams(n_atoms=n_atoms)
        if bonds is not None:
            idx, r0, k = bonds
            p.n_bonds, p.bond_idx, p.bond_r0, p.bond_k = idx.shape[1], i64(idx), f64(r0), f64(k)
        if angles is not None:
            idx, theta0, k = angles
            p.n_angles, p.angle_idx, p.angle_theta0, p.angle_k = idx.shape[1], i64(idx), f64(theta0), f64(k)
        if torsions is not None:
            idx, cos_coef, sin_coef = torsions
            p.n_torsions, p.torsion_idx = idx.shape[1], i64(idx)
            p.n_cos, p.cos_coef = cos_coef.shape[0], f64(cos_coef)
            # A valid pointer even for zero rows, so the C side never sees NULL.
            p.n_sin, p.sin_coef = sin_coef.shape[0], f64(sin_coef if sin_coef.size else np.zeros(1))
        if (nonbonded is not None or gbsa_obc is not None) != (pair_idx is not None):
            raise ValueError("pair_idx goes with the pair terms (nonbonded, gbsa_obc), and only with them")
        if pair_idx is not None:
            p.n_pairs, p.pair_idx = pair_idx.shape[1], i64(pair_idx)
        if nonbonded is not None:
            p.pair_qq, p.pair_c12, p.pair_c6 = (f64(a) for a in nonbonded)
        if gbsa_obc is not None:
            (p.obc_rho, p.obc_scaled, p.obc_half_rho, p.obc_inv_rho, p.obc_inv_radius, p.obc_self, p.obc_ace,
             p.obc_pair_qq) = (f64(a) for a in gbsa_obc)
        self.struct = p
        self._arrays = keep
        self.n_atoms = n_atoms


def energy_and_grad(library: ctypes.CDLL, params: KernelParameters, x: Tensor, need_grad: bool,
                    scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """``scale`` U ``[batch]`` and, if asked, ``scale`` dU/dx ``[batch, 3 n_atoms]``.

    ``x`` is ``[batch, 3 n_atoms]``, float64 on the CPU, in nm; with ``scale = 1`` the results are in
    kJ/mol and kJ/mol/nm, with ``scale = 1/kT`` in kT and kT/nm.
    """
    if x.dtype != torch.float64 or x.device.type != "cpu" or x.ndim != 2 or x.shape[1] != 3 * params.n_atoms:
        raise ValueError(f"the force-field kernel takes float64 CPU positions [batch, {3 * params.n_atoms}], "
                         f"got {x.dtype} on {x.device} with shape {list(x.shape)}")
    x = x.contiguous()
    n_b = x.shape[0]
    energy = torch.empty(n_b, dtype=torch.float64)
    grad = torch.empty_like(x) if need_grad else None
    n_threads = max(1, min(torch.get_num_threads(), n_b // _MIN_PER_THREAD))
    status = library.ff_energy_grad_threads(ctypes.byref(params.struct), n_b, scale, x.data_ptr(), energy.data_ptr(),
                                            None if grad is None else grad.data_ptr(), n_threads)
    if status != 0:
        raise MemoryError("the force-field kernel could not allocate its scratch memory")
    return energy, grad


