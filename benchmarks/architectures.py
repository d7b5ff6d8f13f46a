"""Flow families side by side: which to use for which job.

For every family of ``flow.type`` (coupling, autoregressive, residual, planar/radial/Sylvester) on
the double well, Mueller-Brown and an 8-D many-well, at **equal training wall time** (each family
trains for the same ``--seconds``; the steps it gets are what it can afford), or, with ``--budget
own``, at **each family's own budget** (``OWN_BUDGETS``: a number of optimizer steps, not seconds, so
that the figure does not depend on the load of a shared machine, and a number of flow samples):

- training steps per second (the whole recipe);
- samples per second with log q (sampling direction, no energy), and densities per second of
  external states (density direction; ``-`` where the family has no inverse);
- held-out NLL, -mean log q of 20,000 exact samples not used for training (where the density of
  external data exists; for residual flows it is the estimate, noisy but unbiased for roulette);
- Kish ESS / N and ΔF(A→B) of ``--samples`` (500,000) flow samples against the exact ΔF by quadrature; for residual
  flows also with the exact log-det instead of the estimator, on the same trained flow.

Training data are exact samples (inverse-CDF for the separable double well and many-well, a
1200 x 1200 grid for Mueller-Brown), so the comparison is between flows, not baselines. Recipes:
families with the density of external data train by the default recipe of systems/*.yaml (half
the time forward KL, half mixed KL with forward 0.5 and reverse 1.0); planar, radial and Sylvester
flows, which have none, by reverse KL, annealed from 4x and 2x the temperature to 1x (``--recipe
reverse``: every family by that reverse-KL recipe, for the comparison of reverse-KL training). Its
ActNorm starts from the data, or with ``--reverse-init none`` standardizes the flow's first batch, so
that the recipe never looks at the data (see :func:`train_for`). Each system's data come from their
own seeded stream, so ``--systems`` and ``--families`` pick rows without changing them.

``--alanine`` adds alanine dipeptide (amber14, vacuum): the coupling spline, MAF and IAF (spline
transformers), each trained for ``--alanine-seconds`` by the recipe of systems/alanine.yaml on a
MD of the config (about a minute here; reused from ``--alanine-dir`` when it exists), then ESS and ΔF of
``--alanine-samples`` samples. These runs are short: their ESS compares the families at equal
wall time, and is far below a full run's.

Run it with ``nice``; it prints a markdown table and writes every figure to ``--out`` (JSON).
``python benchmarks/architectures.py --seconds 60 --alanine --out architectures.json``;
``python benchmarks/architectures.py --budget own --systems double_well,mueller_brown --families nice``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzgen.config import FlowConfig
from boltzgen.energies.analytic import AnalyticEnergy, DoubleWell, MuellerBrown
from boltzgen.estimators.free_energy import delta_f
from boltzgen.estimators.weights import kish_ess
from boltzgen.flows.build import build_flow
from boltzgen.flows.residual import exact_log_dets
from boltzgen.generator import BoltzmannGenerator, log_weights
from boltzgen.training import forward_kl_loss, reverse_kl_loss

try:
    from boltzgen.energies.analytic import ManyWell
except ImportError:  # before the many-well energy lands in the package: the same energy, locally
    class ManyWell(AnalyticEnergy):  # type: ignore[no-redef]
        """dim/2 pairs u = x^4 - 6 x^2 - 0.5 x + 0.5 y^2."""

        from boltzgen.energies.analytic import QuadratureBox
        box = QuadratureBox(lower=(-4.0, -9.0), upper=(4.0, 9.0))

        def __init__(self, dim: int = 8) -> None:
            super().__init__(dim=dim)

        def reduced_energy(self, x):
            a, b = x[:, 0::2], x[:, 1::2]
            return (a**4 - 6 * a**2 - 0.5 * a + 0.5 * b**2).sum(dim=1)

        def marginal_energy(self, x):
            return x[:, 0] ** 4 - 6 * x[:, 0] ** 2 - 0.5 * x[:, 0] + 0.5 * x[:, 1] ** 2

N_TRAIN, N_TEST = 100_000, 20_000
N_SAMPLES = 500_000  # --samples
TIMING_BATCH = 10_000

#: family -> flow settings (blocks and widths of the systems' configs; many cheap layers for the
#: families whose layers are cheap and weak). ``nice_normal`` is ``nice`` on the normal prior, for the
#: comparison; ``residual_exact`` the residual architecture with the exact log-det (in low dimension).
FAMILIES: dict[str, dict[str, Any]] = {
    "neural_spline": {"type": "neural_spline"},
    "real_nvp": {"type": "real_nvp"},
    "nice": {"type": "nice", "blocks": 24, "prior": "logistic"},
    "nice_normal": {"type": "nice", "blocks": 24},
    "maf_affine": {"type": "maf", "autoregressive": {"transformer": "affine"}},
    "maf_spline": {"type": "maf"},
    "iaf_affine": {"type": "iaf", "autoregressive": {"transformer": "affine"}},
    "iaf_spline": {"type": "iaf"},
    "iresnet": {"type": "iresnet"},
    "residual_flow": {"type": "residual_flow"},
    "residual_exact": {"type": "residual_flow", "blocks": 8, "lu": True,
                       "residual": {"lipschitz": 0.97, "exact_log_det": True}},
    "planar": {"type": "planar", "blocks": 32},
    "radial": {"type": "radial", "blocks": 32},
    "sylvester": {"type": "sylvester", "blocks": 16, "sylvester": {"variant": "orthogonal"}},
    "sylvester_householder": {"type": "sylvester", "blocks": 16, "sylvester": {"variant": "householder"}},
    "sylvester_triangular": {"type": "sylvester", "blocks": 16, "sylvester": {"variant": "triangular"}},
}

#: (fraction of the time, forward weight, reverse weight, temperature factor, batch, lr)
DEFAULT_RECIPE = [(0.5, 1.0, 0.0, 1.0, 512, 3e-3), (0.5, 0.5, 1.0, 1.0, 1024, 1e-3)]
REVERSE_RECIPE = [(0.3, 0.0, 1.0, 4.0, 1024, 3e-3), (0.3, 0.0, 1.0, 2.0, 1024, 2e-3),
                  (0.4, 0.0, 1.0, 1.0, 1024, 1e-3)]


@dataclass(frozen=True)
class Budget:
    """A family's own budget (``--budget own``): ``steps`` optimizer steps of the whole recipe (not wall
    time, so that the figure does not depend on the load of the machine) and ``samples`` flow samples
    for ESS and ΔF."""

    steps: int
    samples: int = N_SAMPLES


#: (family, system) -> its own budget, for the families that missed the exact ΔF by 0.05 kT at 60 s
#: (the README's second table); a pair not listed trains for ``--seconds``
_FOUR_M = 4_000_000
OWN_BUDGETS: dict[tuple[str, str], Budget] = {
    ("nice", "double_well"): Budget(3000, _FOUR_M), ("nice", "mueller_brown"): Budget(12_000, _FOUR_M),
    ("nice_normal", "double_well"): Budget(3000, _FOUR_M), ("nice_normal", "mueller_brown"): Budget(12_000, _FOUR_M),
    ("planar", "double_well"): Budget(3000, _FOUR_M), ("planar", "mueller_brown"): Budget(10_000, _FOUR_M),
    ("radial", "double_well"): Budget(3000, _FOUR_M), ("radial", "mueller_brown"): Budget(10_000, _FOUR_M),
    ("sylvester", "double_well"): Budget(3000, _FOUR_M), ("sylvester", "mueller_brown"): Budget(10_000, _FOUR_M),
    ("sylvester_householder", "mueller_brown"): Budget(10_000, _FOUR_M),
    ("iresnet", "double_well"): Budget(3000, _FOUR_M), ("residual_flow", "double_well"): Budget(3000, _FOUR_M),
    ("residual_flow", "mueller_brown"): Budget(6000, _FOUR_M), ("iresnet", "mueller_brown"): Budget(3000, _FOUR_M),
    ("residual_exact", "double_well"): Budget(6000, _FOUR_M), ("residual_exact", "mueller_brown"): Budget(6000, _FOUR_M),
}


# --- systems and exact data ---------------------------------------------------------------------------

def quartic_samples(n: int, b: float, c: float, rng: np.random.Generator) -> np.ndarray:
    """Exact samples of p(x) ∝ exp(-(x^4 - b x^2 + c x)) by inverse CDF on a fine grid."""
    grid = np.linspace(-5.0, 5.0, 400_001)
    log_p = -(grid**4 - b * grid**2 + c * grid)
    cdf = np.cumsum(np.exp(log_p - log_p.max()))
    return np.interp(rng.random(n) * cdf[-1], cdf, grid)


def grid_samples(energy: AnalyticEnergy, n: int, rng: np.random.Generator, cells: int = 1200) -> np.ndarray:
    """Samples of a 2-D density from a fine grid over its box: a cell by its probability, then uniform in it."""
    edges = [np.linspace(lo, hi, cells + 1) for lo, hi in zip(energy.box.lower, energy.box.upper)]
    p = energy.bin_probabilities(edges[0], edges[1], sub=2).ravel()
    idx = rng.choice(p.size, size=n, p=p / p.sum())
    i, j = np.unravel_index(idx, (cells, cells))
    width = [np.diff(e)[0] for e in edges]
    return np.stack([edges[0][i] + width[0] * rng.random(n), edges[1][j] + width[1] * rng.random(n)], axis=1)


@dataclass
class System:
    name: str
    energy: AnalyticEnergy
    data: np.ndarray  # exact samples [N_TRAIN + N_TEST, dim]
    states: tuple[str, str]  # expressions as in the configs (on x0, x1)
    exact_delta_f: float
    tail_bound: float = 5.0


SYSTEMS = ("double_well", "mueller_brown", "many_well")


def make_system(name: str, rng: np.random.Generator) -> System:
    n = N_TRAIN + N_TEST
    if name == "double_well":
        energy, b, c = DoubleWell(), 6.0, 1.0
        data = np.stack([quartic_samples(n, b, c, rng), rng.standard_normal(n)], axis=1)
        return System(name, energy, data, ("x0 < 0", "x0 > 0"), _exact(energy, lambda v: v["x0"] > 0))
    if name == "mueller_brown":
        energy = MuellerBrown(0.1)
        in_b = lambda v: v["x1"] <= 1.175 * v["x0"] + 1.59  # noqa: E731  (systems/mueller_brown.yaml)
        return System(name, energy, grid_samples(energy, n, rng), ("x1 > 1.175 * x0 + 1.59", "x1 <= 1.175 * x0 + 1.59"),
                      _exact(energy, in_b), tail_bound=8.0)
    if name == "many_well":
        energy = ManyWell(8)
        data = np.empty((n, 8))
        for k in range(4):
            data[:, 2 * k] = quartic_samples(n, 6.0, -0.5, rng)
            data[:, 2 * k + 1] = rng.standard_normal(n)
        return System(name, energy, data, ("x0 < 0", "x0 > 0"), _exact(energy, lambda v: v["x0"] > 0))
    raise ValueError(f"unknown system {name}")


def _exact(energy: AnalyticEnergy, in_b) -> float:
    p = energy.quadrature_probabilities({"B": in_b, "A": lambda v: ~in_b(v)})
    return -math.log(p["B"] / p["A"])


def state_masks(system: System, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x0, x1 = x[:, 0], x[:, 1]
    if system.name == "mueller_brown":
        in_b = x1 <= 1.175 * x0 + 1.59
    else:
        in_b = x0 > 0
    return ~in_b, in_b


# --- training for a fixed wall time or number of steps ----------------------------------------------

def train_for(generator: BoltzmannGenerator, data: torch.Tensor, recipe: list[tuple], seconds: float,
              seed: int = 0, u_max: float = 1e4, steps: int | None = None, init_from_data: bool = True
              ) -> tuple[int, float]:
    """Train by ``recipe`` for ``seconds`` of wall time, or for ``steps`` optimizer steps where given;
    each phase gets its fraction of the budget and a cosine lr over it; reverse KL cuts energies above
    ``u_max`` lin-log. Returns (steps, seconds spent).

    ``init_from_data``: ActNorm starts from the data, as in ``boltzgen train`` (a recipe with forward KL
    always does); else the recipe never looks at the data, and ActNorm standardizes the flow's first
    batch. Data-initialized, a flow trained by reverse KL starts as a Gaussian over the deepest well
    only, and can miss a well 5 sigma away (radial flows on the double well did).
    """
    torch.manual_seed(seed)
    generator.train()
    if init_from_data or any(w_forward > 0 for _, w_forward, *_ in recipe):
        generator.flow.initialize_from_data(data[:4096])
    done, started = 0, time.perf_counter()
    for fraction, w_forward, w_reverse, temperature, batch, lr in recipe:
        optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
        phase_start, phase_seconds = time.perf_counter(), fraction * seconds
        phase_steps = None if steps is None else max(1, round(fraction * steps))
        taken = 0
        while (progress := taken / phase_steps if phase_steps else
               (time.perf_counter() - phase_start) / phase_seconds) < 1.0:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), dtype=data.dtype)
            if w_forward > 0:
                idx = torch.randint(0, len(data), (batch,))
                loss = loss + w_forward * forward_kl_loss(generator, data[idx])
            if w_reverse > 0:
                rkl, _, _ = reverse_kl_loss(generator, batch, u_max, temperature)
                loss = loss + w_reverse * rkl
            if torch.isfinite(loss):
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(generator.parameters(), 10.0)
                if torch.isfinite(grad_norm):
                    optimizer.step()
            taken += 1
        done += taken
    generator.eval()
    return done, time.perf_counter() - started


# --- measurements ------------------------------------------------------------------------------------

def rate(fn, n: int, repeats: int = 3) -> float:
    """Items per second of ``fn()`` handling ``n`` items: the median of ``repeats`` timed calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


@torch.no_grad()
def weights(generator: BoltzmannGenerator, n: int, batch: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    xs, log_ws = [], []
    for start in range(0, n, batch):
        x, _, log_q = generator.sample_with_log_q(min(batch, n - start))
        log_ws.append(log_weights(generator.energy(x.double()), log_q).numpy())
        xs.append(x.double().numpy())
    return np.concatenate(xs), np.concatenate(log_ws)


@dataclass
class Row:
    system: str
    family: str
    recipe: str
    budget: str  # "60 s" (equal wall time) or "4,000 steps" (the family's own budget)
    parameters: int
    train_steps: int
    train_seconds: float
    steps_per_second: float
    samples_per_second: float
    densities_per_second: float | None
    heldout_nll: float | None
    ess: float
    delta_f_kT: float
    stderr_kT: float
    exact_kT: float
    error_kT: float
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate(system: System, family: str, generator: BoltzmannGenerator, test: torch.Tensor,
             n_samples: int | None = None) -> dict[str, Any]:
    """Speeds, held-out NLL, and ESS and ΔF of ``n_samples`` (default ``--samples``) flow samples."""
    n_samples = n_samples or N_SAMPLES
    caps = generator.flow.capabilities
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["samples_per_second"] = rate(lambda: generator.sample_with_log_q(TIMING_BATCH), TIMING_BATCH)
        out["densities_per_second"] = out["heldout_nll"] = None
        if caps.data_density:
            out["densities_per_second"] = rate(lambda: generator.log_prob(test[:TIMING_BATCH]), TIMING_BATCH)
            out["heldout_nll"] = float(-generator.log_prob(test).double().mean())
    x, log_w = weights(generator, n_samples)
    a, b = state_masks(system, x)
    estimate = delta_f(a, b, log_w, n_bootstrap=100, rng=0)
    out.update(ess=kish_ess(log_w), delta_f_kT=estimate.value, stderr_kT=estimate.stderr)
    if not caps.exact_log_det:
        with exact_log_dets(generator.flow):
            x, log_w = weights(generator, n_samples)
        a, b = state_masks(system, x)
        exact = delta_f(a, b, log_w, n_bootstrap=100, rng=0)
        out["extra"] = {"ess_exact_log_det": kish_ess(log_w), "delta_f_exact_log_det_kT": exact.value,
                        "stderr_exact_log_det_kT": exact.stderr}
    return out


def run_one(system: System, family: str, seconds: float, seed: int, recipe: str = "auto",
            budget: Budget | None = None, reverse_init: str = "data") -> Row:
    """Train ``family`` on ``system`` for ``seconds`` (or ``budget``'s steps) and measure it;
    ``reverse_init`` ("data" or "none"): how the reverse-KL recipe initializes ActNorm (:func:`train_for`)."""
    settings = {"blocks": 6, "hidden": [64, 64], "bins": 10, "tail_bound": system.tail_bound, **FAMILIES[family]}
    config = FlowConfig(**settings)
    torch.manual_seed(seed)
    prior, flow = build_flow(config, system.energy.dim, seed=seed)
    generator = BoltzmannGenerator(prior, flow, system.energy)
    generator.prior.to(torch.float32)
    generator.flow.to(torch.float32)
    data = torch.as_tensor(system.data, dtype=torch.float32)
    train, test = data[:N_TRAIN], data[N_TRAIN:]
    reverse_only = recipe == "reverse" or not flow.capabilities.data_density
    steps, spent = train_for(generator, train, REVERSE_RECIPE if reverse_only else DEFAULT_RECIPE, seconds, seed,
                             steps=None if budget is None else budget.steps, init_from_data=reverse_init == "data")
    measured = evaluate(system, family, generator, test, None if budget is None else budget.samples)
    name = f"annealed reverse KL, ActNorm from {'data' if reverse_init == 'data' else 'its first batch'}"
    return Row(system=system.name, family=family, recipe=name if reverse_only else "forward, mixed",
               budget=f"{seconds:g} s" if budget is None else f"{budget.steps:,} steps",
               parameters=sum(p.numel() for p in flow.parameters()), train_steps=steps, train_seconds=spent,
               steps_per_second=steps / spent, exact_kT=system.exact_delta_f,
               error_kT=measured["delta_f_kT"] - system.exact_delta_f, **measured)


# --- alanine dipeptide ---------------------------------------------------------------------------------

ALANINE_FAMILIES = {"neural_spline": [], "maf_spline": ["flow.type=maf"], "iaf_spline": ["flow.type=iaf"]}
#: overrides of the MD of systems/alanine.yaml (none: the config's MD, ~1 min on this machine)
ALANINE_MD: list[str] = []


def run_alanine(seconds: float, n_samples: int, folder: Path) -> list[dict[str, Any]]:
    """The coupling spline, MAF and IAF on alanine dipeptide at equal training wall time (see the module docstring)."""
    from boltzgen.config import load_config
    from boltzgen.runs.baselines import training_data
    from boltzgen.runs.rundir import RunDir
    from boltzgen.runs.target import build_generator, build_target

    root = Path(__file__).resolve().parents[1]
    rows = []
    for family, overrides in ALANINE_FAMILIES.items():
        config, _ = load_config(root / "systems" / "alanine.yaml", [*ALANINE_MD, "device=cpu", *overrides])
        torch.manual_seed(config.seed)
        target = build_target(config)
        t0 = time.perf_counter()
        data = training_data(config, target, RunDir(folder), progress=False)
        data_seconds = time.perf_counter() - t0
        x_train = torch.as_tensor(data.x, dtype=torch.float64)
        generator = build_generator(config, target, x_train)
        generator.prior.to(torch.float32)
        generator.flow.to(torch.float32)
        # The recipe of the architecture table: systems/alanine.yaml's until it trained by forward KL alone.
        recipe = [(0.5, 1.0, 0.0, 1.0, 256, 1e-3), (0.5, 1.0, 0.1, 1.0, 256, 3e-4)]
        steps, spent = train_for(generator, x_train.float(), recipe, seconds, config.seed, u_max=100.0)
        with torch.no_grad():
            sample_rate = rate(lambda: generator.sample_with_log_q(1000), 1000, repeats=1)
        x, log_w = _alanine_weights(generator, target, n_samples)
        cvs = target.cvs(x)
        masks = target.state_masks(cvs)
        estimate = delta_f(masks["A"], masks["B"], log_w, n_bootstrap=100, rng=0)
        rows.append({"family": family, "train_steps": steps, "train_seconds": spent, "steps_per_second": steps / spent,
                     "samples_per_second": sample_rate, "ess": kish_ess(log_w), "n_samples": n_samples,
                     "delta_f_kT": estimate.value, "stderr_kT": estimate.stderr, "md_or_reuse_seconds": data_seconds,
                     "n_training_frames": int(len(data.x))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def _alanine_weights(generator, target, n: int, batch: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    from boltzgen.geometry import find_alpha_carbon_chirality, is_l_chirality

    quads = find_alpha_carbon_chirality(target.topology)
    xs, log_ws = [], []
    for start in range(0, n, batch):
        x, _, log_q = generator.sample_with_log_q(min(batch, n - start))
        x = x.double()
        log_w = log_weights(generator.energy(x), log_q)
        log_w = torch.where(is_l_chirality(x, quads), log_w, torch.full_like(log_w, -math.inf))  # as the config
        xs.append(x.numpy())
        log_ws.append(log_w.numpy())
    return np.concatenate(xs), np.concatenate(log_ws)


# --- main --------------------------------------------------------------------------------------------

def markdown(rows: list[Row]) -> str:
    head = ("| system | family | recipe | budget | steps | params | steps/s | samples/s | densities/s | "
            "held-out NLL | ESS | ΔF error [kT] |")
    lines = [head, "|" + "---|" * 12]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        error = f"{r.error_kT:+.3f} ± {r.stderr_kT:.3f}" if math.isfinite(r.delta_f_kT) else "not estimable"
        if r.extra:
            error += f" (exact log-det: {r.extra['delta_f_exact_log_det_kT'] - r.exact_kT:+.3f}, " \
                     f"ESS {r.extra['ess_exact_log_det']:.3f})"
        lines.append(f"| {r.system} | {r.family} | {r.recipe} | {r.budget} | {r.train_steps:,} | {r.parameters:,} | "
                     f"{r.steps_per_second:.1f} | "
                     f"{r.samples_per_second:,.0f} | {fmt(r.densities_per_second, ',.0f')} | "
                     f"{fmt(r.heldout_nll, '.3f')} | {r.ess:.3f} | {error} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall time per family and system")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", choices=("auto", "reverse"), default="auto",
                        help="auto: forward then mixed KL where the family has the density of data, else annealed "
                             "reverse KL; reverse: annealed reverse KL for every family")
    parser.add_argument("--reverse-init", choices=("data", "none"), default="data",
                        help="the reverse-KL recipe's ActNorm: from the data (as boltzgen train), or standardizing "
                             "the flow's first batch (the recipe never looks at the data)")
    parser.add_argument("--samples", type=int, default=500_000, help="flow samples for ESS and ΔF")
    parser.add_argument("--budget", choices=("time", "own"), default="time",
                        help="time: every family trains for --seconds; own: the families of OWN_BUDGETS train "
                             "for their own number of steps and draw their own number of samples")
    parser.add_argument("--alanine", action="store_true", help="also alanine dipeptide (MD first, ~1 min)")
    parser.add_argument("--alanine-seconds", type=float, default=60.0)
    parser.add_argument("--alanine-samples", type=int, default=20_000)
    parser.add_argument("--alanine-dir", type=Path, default=Path("runs/benchmark_alanine"))
    parser.add_argument("--out", type=Path, help="write every figure here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    global N_SAMPLES
    N_SAMPLES = args.samples
    rows: list[Row] = []
    for name in args.systems.split(",") if args.systems else []:
        # One stream per system, so that --systems picks a system without changing its data.
        system = make_system(name, np.random.default_rng([args.seed, SYSTEMS.index(name)]))
        print(f"# {name}: exact ΔF {system.exact_delta_f:.4f} kT", flush=True)
        for family in args.families.split(","):
            budget = OWN_BUDGETS.get((family, name)) if args.budget == "own" else None
            rows.append(run_one(system, family, args.seconds, args.seed, args.recipe, budget, args.reverse_init))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    result: dict[str, Any] = {"seconds_per_family": args.seconds, "budget": args.budget,
                              "reverse_init": args.reverse_init, "samples": N_SAMPLES, "threads": 1,
                              "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    if args.alanine:
        result["alanine"] = run_alanine(args.alanine_seconds, args.alanine_samples, args.alanine_dir)
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
