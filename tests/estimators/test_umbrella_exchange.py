"""The window-grid errors when the windows are coupled, as replica exchange between windows couples
them: a slow coordinate whose state the configurations carry from window to window at once."""

from __future__ import annotations

import math

import numpy as np

from boltzgen.estimators.umbrella_grid import WindowGrid, analyze_window_grid
from tests.estimators.test_umbrella import (
    PHI_2D,
    PSI_2D,
    T_AXIS,
    TORUS,
    psi_b,
    torus_kT,
)


def _coupled_windows(rng: np.random.Generator, tau: int, n: int) -> tuple[WindowGrid, list, list]:
    """Windows on phi, states on psi. Every ``tau`` frames one uniform number ``s``, shared by all
    windows, puts psi in state B in window k when ``s < p_B(k)`` (k's own probability of B), and psi
    is drawn within that state: each window's series is exact, but the windows' slow psi moves
    together, as when exchanges carry a configuration's state from window to window."""
    grid = WindowGrid(np.radians(np.arange(-180.0, 180.0, 30.0))[:, None], [10.0], [True])
    bias = grid.bias_kT(T_AXIS[:, None])
    shared = rng.uniform(size=n // tau)
    in_b = psi_b(T_AXIS)
    values, states = [], []
    for k in range(grid.n_windows):
        log_p = -torus_kT(PHI_2D, PSI_2D) - bias[k][:, None]
        p = np.exp(log_p - log_p.max())
        p_psi = p.sum(axis=0) / p.sum()
        b_blocks = shared < p_psi[in_b].sum()
        psi_idx = [rng.choice(TORUS, p=np.where(in_b == b, p_psi, 0.0) / p_psi[in_b == b].sum()) for b in b_blocks]
        phi = np.concatenate([T_AXIS[rng.choice(TORUS, tau, p=p[:, j] / p[:, j].sum())] for j in psi_idx])
        b = np.repeat(b_blocks, tau)
        values.append(phi[:, None])
        states.append(np.stack([~b, b], axis=1))
    return grid, values, states


def test_joint_blocks_see_the_correlation_between_windows() -> None:
    """Blocks drawn independently per window treat the windows' slow psi as independent and give
    an error well below the spread over repeats; the same blocks in every window cover it."""
    rng = np.random.default_rng(5)
    edges = [np.linspace(-math.pi, math.pi, 13)]
    estimates, joint, apart = [], [], []
    for repeat in range(40):
        grid, values, states = _coupled_windows(rng, tau=20, n=800)
        if repeat >= 8:  # the spread over repeats needs many; the errors, a few
            estimates.append(analyze_window_grid(grid, values, states, edges, n_bootstrap=0).delta_f_kT[0])
            continue
        for out, together in ((joint, True), (apart, False)):
            est = analyze_window_grid(grid, values, states, edges, subsample=False, n_bootstrap=20, n_blocks=10,
                                      rng=rng, joint_blocks=together)
            out.append(est.stderr_bootstrap_kT[0])
        estimates.append(est.delta_f_kT[0])
    spread = np.std(estimates, ddof=1)
    assert 0.6 < np.mean(joint) / spread < 1.6
    assert np.mean(apart) / spread < 0.75
    assert np.mean(joint) > 1.5 * np.mean(apart)


def test_joint_blocks_need_windows_of_one_length() -> None:
    grid = WindowGrid(np.array([[0.0], [1.0]]), [5.0], [False])
    values = [np.zeros((40, 1)), np.zeros((30, 1))]
    states = [np.ones((40, 2), bool), np.ones((30, 2), bool)]
    try:
        analyze_window_grid(grid, values, states, [np.linspace(-1, 2, 4)], joint_blocks=True)
    except ValueError as exc:
        assert "equal length" in str(exc)
    else:
        raise AssertionError("windows of different lengths were accepted")
