"""The Monte-Carlo check shared by the two-stage tests: an expected loss and its input gradient against the mean of
seeded draws of the framework's sampled loss."""

from __future__ import annotations

import torch


def assert_expectation_is_the_monte_carlo_mean(expected, official, shape, draws: int) -> None:
    """``expected(directions)`` gives the expected terms, the input gradient projected on ``directions`` and the
    gradient; ``official(seed, directions)`` one seeded draw's terms and projection. Every term and projection
    (three random directions and the expected gradient's own) must lie within 3 standard errors of the draws'
    mean, and every one must move with the draw (else the check would average nothing)."""
    directions = [torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    terms, projected, grad = expected(directions)
    directions.append(grad / grad.norm())
    projected = torch.cat([projected, (grad * directions[-1]).sum().reshape(1)])
    samples = [official(seed, directions) for seed in range(draws)]
    assert set(samples[0][0]) == set(terms)
    for name in terms:
        values = torch.tensor([s[0][name] for s in samples], dtype=torch.float64)
        se = float(values.std() / draws ** 0.5)
        assert se > 0, name  # the draw moves every term here: the test has something to average
        assert abs(float(values.mean()) - terms[name]) <= 3 * se, (name, float(values.mean()), terms[name], se)
    g = torch.stack([s[1] for s in samples])
    se = g.std(0) / draws ** 0.5
    assert bool((se > 0).all())
    assert bool(((g.mean(0) - projected).abs() <= 3 * se).all()), ((g.mean(0) - projected) / se)
