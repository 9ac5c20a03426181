"""The memorisation diagnostic: copies score 1, fresh draws from the data distribution ~ the percentile."""

import torch

from sfdbench.metrics.memorisation import memorisation_fraction, nearest_distances


def test_nearest_distances_match_brute_force_and_exclude_self():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 1, 3, 3, generator=g), torch.randn(11, 1, 3, 3, generator=g)
    brute = torch.tensor([min(float((x - y).norm()) for y in b) for x in a], dtype=torch.float64)
    assert torch.allclose(nearest_distances(a, b, chunk=3), brute)
    self_nn = nearest_distances(b, b, exclude_self=True, chunk=4)
    brute_self = torch.tensor([min(float((b[i] - b[j]).norm()) for j in range(11) if j != i) for i in range(11)],
                              dtype=torch.float64)
    assert torch.allclose(self_nn, brute_self)


def test_copies_score_one_and_fresh_draws_score_near_the_percentile():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(2000, 16, generator=g)
    assert memorisation_fraction(train[:300] + 1e-6, train) == 1.0
    fresh = torch.randn(4000, 16, generator=g)
    assert 0.02 < memorisation_fraction(fresh, train, percentile=5.0) < 0.09
