"""A batched, differentiable torch re-implementation of an ``openmm.System``.

:class:`TorchForceField` reads the parameters of a (non-periodic) OpenMM system once
(:mod:`boltzgen.energies.ffparams`, which lists the supported forces and their exact forms) and
evaluates the potential energy of a whole batch of configurations, on CPU or CUDA without a
per-sample Python loop. Forces are derived analytically in the same pass and handed to autograd,
so ``torch.autograd.grad`` of the energy costs no second evaluation.

Two evaluators compute the same terms with the same formulas: on the CPU in float64 the fused C
kernel (:mod:`boltzgen.energies.native`, compiled at first use; 15-25x faster on alanine
dipeptide), and everywhere else (no C compiler, CUDA, float32, or ``native=False``) the eager
torch kernels of :mod:`boltzgen.energies.eager`.

Units: positions in nm, energies in kJ/mol (:meth:`TorchForceField.energy_and_forces_kJ`) or kT
(:meth:`TorchForceField.reduced_energy`), forces in kJ/mol/nm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import openmm
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from boltzgen.energies import eager
from boltzgen.energies import native as native_kernel
from boltzgen.energies.base import Energy
from boltzgen.energies.ffparams import ForceFieldParameters, read_system
from boltzgen.units import kT_kJ_per_mol


class TorchForceField(Energy):
    """Reduced potential ``u(x) = U(x)/kT`` of an ``openmm.System``, evaluated in torch.

    ``system`` is a non-periodic OpenMM system made only of the supported forces (see
    :mod:`boltzgen.energies.ffparams`; anything else raises a one-line ``ValueError``), and
    ``temperature_K`` (K) defines ``kT``. ``chunk_size`` bounds the configurations the eager kernels
    evaluate in one vectorized pass; each term further caps its block so that configurations x rows
    (bonds, angles, torsion quadruplets or atom pairs) stays bounded (see
    :mod:`boltzgen.energies.eager`). Gradients are analytic and computed alongside the energy, so the
    memory held for the backward pass is only ``[batch, 3 n_atoms]``. ``native`` selects the fused C
    kernel on the CPU in float64: ``None`` (default) where it builds, ``True`` to require it (an
    error says why it cannot be built), ``False`` never.

    ``x`` is ``[batch, 3 n_atoms]`` in nm; energies are ``[batch]``. The default dtype is float64;
    ``module.to(torch.float32)`` switches the computation to float32 (eager kernels).
    """

    # The kernel parameters hold raw pointers, and whether the kernel runs depends on the machine.
    _runtime_attributes: ClassVar[dict[str, Callable[[], Any]]] = {"_kernel_params": lambda: None,
                                                                   "_native_decision": lambda: None}

    def __init__(self, system: openmm.System, temperature_K: float, chunk_size: int = 4096,
                 native: bool | None = None) -> None:
        n_atoms = system.getNumParticles()
        super().__init__(3 * n_atoms)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.native = native
        self.n_atoms = n_atoms
        self.temperature_K = float(temperature_K)
        self.kT_kJ_per_mol = kT_kJ_per_mol(temperature_K)
        self.chunk_size = int(chunk_size)
        self.ff_params: ForceFieldParameters = read_system(system)
        self.terms: tuple[str, ...] = self.ff_params.terms
        # The eager kernels' tensors follow the module's device and dtype (see _apply); the C kernel
        # reads the float64 arrays of ff_params.
        self._eager = eager.EagerParameters.from_parameters(self.ff_params)
        # The C kernel's parameter block: built on first use, not state.
        self._kernel_params: native_kernel.KernelParameters | None = None
        # uses_native_kernel(), decided once per placement of the parameters (see _apply).
        self._native_decision: bool | None = None
        # The device and dtype of the computation.
        self.register_buffer("_kT", torch.tensor(self.kT_kJ_per_mol, dtype=torch.float64))

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TorchForceField:
        # .to(), .cuda(), .double() ... all come through here: the eager tensors follow the buffers,
        # and the kernel decision is made again.
        self._native_decision = None
        self._eager = self._eager.apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def uses_native_kernel(self) -> bool:
        """Whether evaluations on the CPU in float64 run in the fused C kernel (builds it if needed)."""
        if self._native_decision is None:
            self._native_decision = self._decide_native(self._kT)
        return self._native_decision

    def _decide_native(self, kT: Tensor) -> bool:
        if self.native is False or kT.device.type != "cpu" or kT.dtype != torch.float64:
            return False
        if native_kernel.load_kernel() is None:
            if self.native:
                raise RuntimeError(f"the force-field C kernel is unavailable: {native_kernel.unavailable_reason()}; "
                                   "install a C compiler (or set CC), or use native=False")
            return False
        return bool(self.terms)

    def _kernel_parameters(self) -> native_kernel.KernelParameters:
        """The C kernel's parameter block of every term, built once from :attr:`ff_params`."""
        if self._kernel_params is None:
            p = self.ff_params
            b, a, t, nb, obc = p.bonds, p.angles, p.torsions, p.nonbonded, p.obc
            self._kernel_params = native_kernel.KernelParameters(
                p.n_atoms,
                bonds=None if b is None else (b.idx, b.r0, b.k),
                angles=None if a is None else (a.idx, a.theta0, a.k),
                torsions=None if t is None else (t.idx, t.cos_coef, t.sin_coef),
                pair_idx=p.pair_idx,
                nonbonded=None if nb is None else (nb.qq, nb.c12, nb.c6),
                gbsa_obc=None if obc is None else (
                    obc.rho, obc.scaled, obc.half_offset_radius, obc.inv_offset_radius, obc.inv_radius,
                    obc.self_coef, obc.ace, obc.pair_qq),
            )
        return self._kernel_params

    def _prepare(self, x: Tensor) -> Tensor:
        """``x`` ``[batch, 3 n_atoms]`` detached and in the module's dtype; the module follows its device."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape [batch, {self.dim}], got {list(x.shape)}")
        kT = self._kT
        if x.device != kT.device:
            # The energy follows its input's device; parameters are moved once and then stay.
            self.to(x.device)
            kT = self._kT
        # Each call here costs microseconds, and a training step makes several: skip the no-ops.
        if x.requires_grad:
            x = x.detach()
        return x if x.dtype == kT.dtype else x.to(kT.dtype)

    def _evaluate(self, x: Tensor, need_grad: bool, scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
        """``scale`` times the energy ``[batch]`` (kJ/mol) and, if asked, of dU/dx ``[batch, 3 n_atoms]``
        (kJ/mol/nm), for prepared ``x`` (:meth:`_prepare`): in the C kernel where
        :meth:`uses_native_kernel`, else in the eager kernels."""
        if self.uses_native_kernel():
            library = native_kernel.load_kernel()
            assert library is not None
            return native_kernel.energy_and_grad(library, self._kernel_parameters(), x, need_grad, scale)
        return eager.energy_and_grad(self._eager, x, need_grad, scale, self.chunk_size)

    def reduced_energy(self, x: Tensor) -> Tensor:
        """u(x) = U(x)/kT for ``x`` ``[batch, 3 n_atoms]`` in nm; returns ``[batch]`` in the module's dtype.

        Differentiable with respect to ``x`` (first derivatives only).
        """
        return _TorchFFFunction.apply(x, self, 1.0 / self.kT_kJ_per_mol)

    def energy_and_forces_kJ(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """U(x) ``[batch]`` in kJ/mol and F = -dU/dx ``[batch, 3 n_atoms]`` in kJ/mol/nm, in one pass,
        for ``x`` ``[batch, 3 n_atoms]`` in nm (no autograd graph)."""
        energy, grad = self._evaluate(self._prepare(x), True)
        assert grad is not None
        return energy, -grad


class _TorchFFFunction(torch.autograd.Function):
    """``scale`` times the energy in forward; the analytic gradient computed alongside it is handed
    out in backward.

    The gradient buffer belongs to this graph node alone (kept on ``ctx``, not saved as an input or
    output), so backward scales it in place and gives it away: no copy. A second backward through the
    same graph (``retain_graph=True``) therefore raises instead of reusing a buffer the caller may
    have changed.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: TorchForceField, scale: float) -> Tensor:
        need_grad = bool(ctx.needs_input_grad[0])
        energy, grad = module._evaluate(module._prepare(x), need_grad, scale)
        if need_grad:
            ctx.grad = grad
            ctx.input_dtype = x.dtype
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_energy: Tensor) -> tuple[Tensor, None, None]:
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("TorchForceField: backward through the same energy evaluation twice is not "
                               "supported; evaluate the energy again")
        grad_energy = grad_energy.to(grad.dtype)
        if grad.device.type == "cpu":
            # numpy: single-threaded, so no OpenMP pool to wake for one light pass over memory.
            weights = grad_energy.numpy()
            if weights.ndim == 1 and weights.strides[0] == 0:
                weights = weights[:1]  # one weight broadcast over the batch (u.sum(), u.mean())
            if not (weights.shape == (1,) and weights[0] == 1.0):
                np.multiply(grad.numpy(), weights[:, None], out=grad.numpy())
        else:
            grad.mul_(grad_energy.unsqueeze(1))
        return grad.to(ctx.input_dtype), None, None
