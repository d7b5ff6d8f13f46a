"""The latent densities: normalized, sampled as they say, circular dimensions uniform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from boltzgen.config import FlowConfig
from boltzgen.flows.build import build_flow
from boltzgen.flows.priors import Prior


@pytest.mark.parametrize("base", ["normal", "logistic"])
def test_one_dimensional_density_integrates_to_one_and_matches_scipy(base):
    prior = Prior(1, base=base).to(torch.float64)
    reference = stats.norm if base == "normal" else stats.logistic
    z = torch.linspace(-30.0, 30.0, 601, dtype=torch.float64)[:, None]
    log_p = prior.log_prob(z).numpy()
    np.testing.assert_allclose(log_p, reference.logpdf(z[:, 0].numpy()), rtol=1e-12, atol=1e-12)
    total, _ = integrate.quad(lambda t: math.exp(float(prior.log_prob(torch.tensor([[t]], dtype=torch.float64)))),
                              -math.inf, math.inf)
    assert total == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("base", ["normal", "logistic"])
def test_samples_follow_the_density(base):
    prior = Prior(3, base=base).to(torch.float64)
    z = prior.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (20_000, 3) and z.dtype == torch.float64 and torch.isfinite(z).all()
    reference = stats.norm if base == "normal" else stats.logistic
    for d in range(3):
        assert stats.kstest(z[:, d].numpy(), reference.cdf).pvalue > 1e-3


def test_logistic_and_normal_differ_in_the_tails():
    normal, logistic = Prior(1), Prior(1, base="logistic")
    z = torch.tensor([[8.0]])
    # the logistic log density falls linearly: at 8 it is ~24 nats above the normal's
    assert float(logistic.log_prob(z) - normal.log_prob(z)) > 20


def test_circular_dimensions_stay_uniform_under_a_logistic_base():
    circular = torch.tensor([True, False])
    prior = Prior(2, circular, base="logistic").to(torch.float64)
    z = prior.sample(5000, generator=torch.Generator().manual_seed(1))
    assert float(z[:, 0].abs().max()) <= math.pi
    assert stats.kstest(z[:, 0].numpy(), stats.uniform(-math.pi, 2 * math.pi).cdf).pvalue > 1e-3
    points = torch.tensor([[0.3, 1.5], [4.0, 1.5]], dtype=torch.float64)
    expected = -math.log(2 * math.pi) + stats.logistic.logpdf(1.5)
    assert float(prior.log_prob(points)[0]) == pytest.approx(expected, abs=1e-12)
    assert prior.log_prob(points)[1] == -math.inf


def test_a_zero_uniform_draw_gives_a_finite_logistic_latent(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape, dtype=kw.get("dtype")))
    z = Prior(2, base="logistic").sample(4)
    assert torch.isfinite(z).all()


def test_unknown_base_is_refused():
    with pytest.raises(ValueError, match="unknown prior"):
        Prior(2, base="cauchy")  # type: ignore[arg-type]


def test_the_config_key_reaches_the_built_prior():
    prior, _ = build_flow(FlowConfig(type="nice", blocks=2, prior="logistic"), 2)
    assert prior.base == "logistic"
    assert build_flow(FlowConfig(type="nice", blocks=2), 2)[0].base == "normal"


def test_a_flow_on_a_logistic_prior_gives_its_samples_the_density_it_evaluates():
    from boltzgen.energies.analytic import DoubleWell
    from boltzgen.generator import BoltzmannGenerator

    torch.manual_seed(0)
    prior, flow = build_flow(FlowConfig(type="nice", blocks=4, prior="logistic", identity_init=False), 2)
    generator = BoltzmannGenerator(prior.to(torch.float64), flow.to(torch.float64), DoubleWell())
    with torch.no_grad():
        x, _, log_q = generator.sample_with_log_q(1000)
        torch.testing.assert_close(generator.log_prob(x), log_q, rtol=0, atol=1e-9)
