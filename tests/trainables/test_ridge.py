"""The streaming ridge probe (trainables.train.ridge): its weights are a direct ridge solve's,
batches add up to one batch, the projection bounds memory, separable data scores 100%."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.trainables.train.ridge import StreamingRidge, probe_scores


def _data(n=120, dim=10, classes=3, seed=0):
    """Features at scales 0.1..5 and offsets (the same for every seed), labels cycling."""
    fixed = np.random.default_rng(100)
    scale, offset = fixed.uniform(0.1, 5.0, size=dim), fixed.normal(size=dim)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) * scale + offset, np.arange(n) % classes


def _separable(n, dim, classes, seed):
    """Unit noise; class c adds 3 to its own 50 dims."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, dim))
    for c in range(classes):
        x[np.ix_(y == c, range(50 * c, 50 * (c + 1)))] += 3.0
    return x, y


def _direct(x, y, classes, alpha):
    """Ridge with an intercept on standardised x, one-hot y: the augmented least squares."""
    xs = (x - x.mean(0)) / x.std(0)
    onehot = np.eye(classes)[y]
    yc = onehot - onehot.mean(0)
    a = np.vstack([xs, np.sqrt(alpha) * np.eye(x.shape[1])])
    b = np.vstack([yc, np.zeros((x.shape[1], classes))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    return xs @ w + onehot.mean(0)


@pytest.mark.parametrize("lam", [1e-3, 1.0])
def test_matches_a_direct_least_squares_solve(lam):
    x, y = _data()
    ridge = StreamingRidge(10, 3, project_to=None)
    for s in (slice(0, 50), slice(50, 51), slice(51, 120)):  # batches of any size add up
        ridge.update(x[s], y[s])
    sol = ridge.solve([lam])
    got = sol.decision(x)[0].numpy()
    np.testing.assert_allclose(got, _direct(x, y, 3, lam * len(y)), rtol=1e-6, atol=1e-8)


def test_matches_sklearn_ridge():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _data(n=90, dim=7, classes=4, seed=3)
    ridge = StreamingRidge(7, 4, project_to=None)
    ridge.update(torch.from_numpy(x).float(), torch.from_numpy(y))
    sol = ridge.solve([0.1])
    xs = (x.astype(np.float32).astype(np.float64) - sol.mean.numpy()) / sol.scale.numpy()
    ref = sklearn.Ridge(alpha=0.1 * 90).fit(xs, np.eye(4)[y])
    np.testing.assert_allclose(sol.weights[0].numpy(), ref.coef_.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sol.bias.numpy(), ref.intercept_, atol=1e-9)


def test_projection_keeps_memory_to_d_squared():
    wide, d = 16384, 64
    ridge = StreamingRidge(wide, 5, project_to=d, seed=1)
    assert ridge.projected and ridge.dim == d
    assert ridge.gram.shape == (d, d) and ridge.cross.shape == (d, 5)
    held = sum(t.numel() for t in (ridge.gram, ridge.cross, ridge.sum, ridge._bucket,
                                   ridge._sign))
    assert held < d * d + 4 * wide  # never a wide x d (or wide x wide) matrix
    # balanced: every output sums wide / d inputs
    assert torch.bincount(ridge._bucket, minlength=d).tolist() == [wide // d] * d
    x = torch.randn(3, 64, 16, 16)  # [N x C x p x p] rows are flattened
    z = ridge.project(x)
    assert z.shape == (3, d)
    # seeded: the same seed projects alike, another differently
    np.testing.assert_array_equal(z, StreamingRidge(wide, 5, project_to=d, seed=1).project(x))
    assert not torch.equal(z, StreamingRidge(wide, 5, project_to=d, seed=2).project(x))
    # inner products are kept in expectation (a sketch of 64 from 16k: loosely)
    a = torch.randn(200, wide, dtype=torch.float64)
    pa_ = ridge.project(a)
    ratio = (pa_ * pa_).sum(1) / (a * a).sum(1)
    assert abs(float(ratio.mean()) - 1.0) < 0.1


def test_separable_data_scores_100():
    x, y = _separable(200, 3000, 5, seed=2)
    xv, yv = _separable(100, 3000, 5, seed=7)
    out = probe_scores(x, y, xv, yv, project_to=256, chunk=37)
    assert out["val_top1"] == 100.0
    assert out["dim"] == 3000 and out["probe_dim"] == 256
    assert set(out["val_top1_by_lambda"]) >= {out["lambda"]}


def test_noise_scores_near_chance():
    x, y = _data(n=300, dim=20, classes=4, seed=4)
    xv, yv = _data(n=400, dim=20, classes=4, seed=5)
    out = probe_scores(x, y, xv, yv)
    assert out["probe_dim"] == 20  # narrow inputs are not projected
    assert 10.0 < out["val_top1"] < 45.0


def test_bad_input():
    ridge = StreamingRidge(4, 2)
    with pytest.raises(ValueError, match="no rows"):
        ridge.solve()
    with pytest.raises(ValueError, match="labels outside"):
        ridge.update(np.zeros((2, 4)), [0, 2])
    with pytest.raises(ValueError, match="5 features"):
        ridge.update(np.zeros((2, 5)), [0, 1])
    ridge.update(np.ones((2, 4)), [0, 1])  # constant features: no division by zero
    assert np.isfinite(ridge.solve([1.0]).decision(np.ones((1, 4))).numpy()).all()
