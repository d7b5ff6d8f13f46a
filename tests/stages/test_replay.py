"""The prioritized replay buffer: sampling probabilities, weight updates, dropping, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from boltzgen.stages.replay import PrioritizedReplayBuffer


def filled(log_w: list[float], capacity: int = 16) -> PrioritizedReplayBuffer:
    buffer = PrioritizedReplayBuffer(capacity, dim=2, dtype=torch.float64)
    n = len(log_w)
    buffer.add(torch.arange(2 * n, dtype=torch.float64).reshape(n, 2), torch.tensor(log_w), torch.zeros(n))
    return buffer


def test_sampling_probabilities_are_proportional_to_the_weights():
    log_w = [0.0, math.log(2), math.log(3), math.log(4), -math.inf]
    buffer = filled(log_w)
    assert buffer.size == 4 and buffer.n_usable == 4  # the weight-0 sample is never stored
    expected = np.array([1, 2, 3, 4]) / 10
    np.testing.assert_allclose(buffer.probabilities().numpy(), expected, rtol=1e-12)
    # a single draw (without replacement is then the same) picks entry i with probability w_i / sum w
    counts = np.bincount([int(buffer.sample(1).indices) for _ in range(4000)], minlength=4)
    assert stats.chisquare(counts, 4000 * expected).pvalue > 1e-3
    # with replacement, when fewer entries than asked have weight: still proportional
    many = buffer.sample(20_000).indices.numpy()
    assert stats.chisquare(np.bincount(many, minlength=4), 20_000 * expected).pvalue > 1e-3


def test_a_batch_without_replacement_has_distinct_entries_and_favours_heavy_ones():
    buffer = filled([0.0] * 8 + [5.0] * 4)
    picks = torch.stack([buffer.sample(6).indices for _ in range(500)])
    assert all(len(set(row.tolist())) == 6 for row in picks)
    heavy = (picks >= 8).sum(1).float().mean()
    assert heavy > 3.5  # the 4 heavy entries (e^5 = 148 times heavier) are nearly always in


def test_updates_change_weights_and_drop_nonfinite_entries():
    buffer = filled([0.0, 0.0, 0.0])
    buffer.update(torch.tensor([0, 1, 2]), torch.tensor([math.log(3), math.nan, 0.0]), torch.tensor([1.5, 2.0, math.inf]))
    np.testing.assert_allclose(buffer.log_w[:3].numpy(), [math.log(3), -math.inf, -math.inf])
    assert buffer.log_q[0] == 1.5 and buffer.n_dropped == 2 and buffer.n_usable == 1
    assert torch.all(buffer.sample(4).indices == 0)


def test_ring_overwrites_the_oldest_and_state_round_trips():
    buffer = PrioritizedReplayBuffer(4, dim=1, dtype=torch.float64)
    for start in (0, 3):
        buffer.add(torch.arange(start, start + 3, dtype=torch.float64)[:, None], torch.zeros(3), torch.zeros(3))
    assert buffer.size == 4 and sorted(buffer.x[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
    copy = PrioritizedReplayBuffer(4, dim=1, dtype=torch.float64)
    copy.load_state_dict(buffer.state_dict())
    for name in ("x", "log_w", "log_q"):
        assert torch.equal(getattr(copy, name), getattr(buffer, name))
    assert (copy.size, copy.position) == (buffer.size, buffer.position)
    with pytest.raises(ValueError):
        PrioritizedReplayBuffer(8, dim=1).load_state_dict(buffer.state_dict())
