"""The settings of the training stages that need no data, ``fab`` and ``annealing``: part of a
config's ``training`` stages (:class:`boltzgen.config.TrainingStage`), validated and reported as one
line like every other key."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, model_validator

from boltzgen.config_base import StrictModel

#: Samples a stage may store (replay buffer, reweighted set) and steps: beyond them no run fits or ends.
MAX_STORED = 10**9
MAX_STEPS = 10**10


class AISConfig(StrictModel):
    """Annealed importance sampling of a ``fab`` stage: from the flow q to p^2/q through
    ``intermediate`` geometric intermediates q^(1-b) (p^2/q)^b (b evenly spaced in (0, 1)), each with
    ``hmc_steps`` HMC transitions of ``leapfrog`` steps in the flow's latent space. The step sizes
    (one per intermediate, latent units) start at ``step_size`` and, with ``adapt_step_size``,
    follow the acceptance toward ``target_accept`` after every AIS batch."""

    intermediate: int = Field(default=2, ge=0, le=1000)
    hmc_steps: int = Field(default=1, ge=1, le=100)
    leapfrog: int = Field(default=5, ge=1, le=1000)
    step_size: PositiveFloat = 0.1
    adapt_step_size: bool = True
    target_accept: float = Field(default=0.65, gt=0.0, lt=1.0)


class ReplayConfig(StrictModel):
    """The prioritized replay buffer of a ``fab`` stage: the last ``size`` AIS samples with their
    log-weights; each AIS batch of ``batch`` samples is followed by ``updates`` gradient steps on
    ``updates`` minibatches drawn at once, without replacement, with probability proportional to the
    weights (the first AIS batches fill it to ``min_size``, at least ``updates x batch``). A reused
    sample's weight is corrected by q_old/q (at most ``max_weight_adjust``)."""

    size: int = Field(default=262144, ge=2, le=MAX_STORED)
    min_size: int = Field(default=65536, ge=1, le=MAX_STORED)
    updates: int = Field(default=4, ge=1, le=1000)
    max_weight_adjust: PositiveFloat = 10.0

    @model_validator(mode="after")
    def _min_below_size(self) -> "ReplayConfig":
        if self.min_size > self.size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed size ({self.size})")
        return self


class FABConfig(StrictModel):
    """The settings of a ``fab`` stage: its AIS and its replay buffer (``replay: null``: no buffer, each
    step trains on a fresh AIS batch)."""

    ais: AISConfig = AISConfig()
    replay: ReplayConfig | None = ReplayConfig()


class ReweightingConfig(StrictModel):
    """The settings of a ``reweighted_forward_kl`` stage: ``samples`` flow samples are drawn, given
    their importance weights toward p, and fitted by maximum likelihood (minibatches resampled by
    weight), drawn afresh every ``resample_every`` steps (``null``: once, at the stage's start).
    ``truncate_weights``: for the fit only, weights above sqrt(N) times their mean are cut to that
    (truncated importance sampling, Ionides 2008), so that one sample in a hole of q does not fill
    nearly every minibatch; estimates after training always use the full weights."""

    samples: int = Field(default=100_000, ge=2, le=MAX_STORED)
    resample_every: int | None = Field(default=250, ge=1, le=MAX_STEPS)
    truncate_weights: bool = False


class AnnealingConfig(StrictModel):
    """Temperature annealing of an ``annealing`` stage (TA-BG): ``temperatures`` are factors of the
    target temperature, decreasing to 1. The first ``hot_fraction`` of the steps trains by reverse KL
    at the first; the rest are shared by the others: at each, ``samples`` flow samples are drawn,
    reweighted to it and fitted by maximum likelihood (minibatches resampled by weight), drawn afresh
    every ``resample_every`` steps if set."""

    temperatures: list[PositiveFloat] = Field(min_length=2, max_length=1000)
    hot_fraction: float = Field(default=0.5, ge=0.0, lt=1.0)
    samples: int = Field(default=20000, ge=2, le=MAX_STORED)
    resample_every: int | None = Field(default=None, ge=1, le=MAX_STEPS)

    @model_validator(mode="after")
    def _decreasing_to_one(self) -> "AnnealingConfig":
        t = self.temperatures
        if any(a <= b for a, b in zip(t, t[1:])) or t[-1] != 1.0:
            raise ValueError(f"temperatures must decrease strictly and end at 1.0, got {t}")
        return self
