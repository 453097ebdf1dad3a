"""A streaming closed-form ridge probe: how well one (block, t)'s features classify, with no
SGD epochs (the search's probe rung scores every cell of its block x timestep map with it).

Features stream in batch by batch (:meth:`StreamingRidge.update`); the probe keeps only sums:
``n``, ``sum z`` [D], ``Z^T Z`` [D x D] and ``Z^T Y`` [D x C] (Y the one-hot labels), in
float64. :meth:`StreamingRidge.solve` standardises the features from the same sums (mean and
population variance of each of the D inputs), centres Y (the intercept), and solves ridge
regression on one-hot labels for several strengths at once from one eigendecomposition of the
standardised Gram matrix. A strength ``lam`` is relative: the penalty is ``lam * n ||W||^2``
on standardised features (each of whose squared norms is n), so one list of strengths fits
any sample size.

Memory is bounded for wide blocks (16,384 dims for block 1 of ``paper256`` at pool 8): inputs
wider than ``project_to`` (default 2048) are first mapped to ``project_to`` dims by a seeded
sparse random projection (a balanced count sketch: input i is added, with a seeded random
sign, to output ``perm[i] mod D``). It holds two [dim] index vectors, not a dense dim x D
matrix (128 MB of float32 at 16k x 2048), costs O(N dim) per batch instead of O(N dim D),
and like a Gaussian projection preserves inner products in expectation. The probe's memory
is then ``D^2 + D C`` float64 whatever the block's width (32 MB at D = 2048). The features
are standardised after the projection (standardising before it would need the full
dim x dim sums), so the probe sees the block's channels at their own scales.

Pure torch; no Ray, no search imports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: the ridge strengths tried (relative to n: the penalty is lam * n * ||W||^2)
LAMBDAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: the widest input the probe keeps unprojected (and the width it projects to)
PROJECT_TO = 2048
#: rows read at once by :func:`probe_scores`
CHUNK = 1024
_EPS = 1e-12


def _as_tensor(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)


@dataclass
class RidgeSolution:
    """Ridge weights for several strengths, in the space of the (projected) inputs.

    :param lambdas: [L] the strengths.
    :param weights: [L x D x C] the weights on standardised (projected) inputs.
    :param mean: [D] the inputs' means; ``scale``: [D] their standard deviations.
    :param bias: [C] the labels' means (the intercept).
    """

    lambdas: tuple[float, ...]
    weights: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    ridge: StreamingRidge

    def decision(self, x: Any) -> torch.Tensor:
        """:param x: [N x dim] features (any trailing shape, flattened).
        :return: [L x N x C] float64 scores, one set per strength."""
        z = self.ridge.project(x)
        z = (z - self.mean) / self.scale
        return torch.einsum("nd,ldc->lnc", z, self.weights) + self.bias

    def predict(self, x: Any) -> torch.Tensor:
        """:return: [L x N] int64 predicted classes of ``x`` [N x dim], one row per strength."""
        return self.decision(x).argmax(dim=-1)

    def correct(self, x: Any, y: Any) -> np.ndarray:
        """:return: [L] int64 how many of ``x`` [N x dim] each strength classifies as ``y``
        [N] (sum it over batches for a split's top-1)."""
        y = _as_tensor(y).to(self.weights.device, torch.int64)
        return (self.predict(x) == y).sum(dim=1).cpu().numpy()

    def score(self, x: Any, y: Any) -> np.ndarray:
        """:return: [L] top-1 (%) of each strength on ``x`` [N x dim], ``y`` [N]."""
        return 100.0 * self.correct(x, y) / max(1, len(y))


class StreamingRidge:
    """Ridge regression on one-hot labels from accumulated sums (see the module).

    :param dim: the width of one row of features (trailing dims are flattened: C*p*p).
    :param classes: the number of classes (labels in ``0..classes-1``).
    :param project_to: inputs wider than this are projected to this many dims (None: never).
    :param seed: the projection's seed.
    :param device: where the sums are kept and the matrices multiplied.
    """

    def __init__(self, dim: int, classes: int, *, project_to: int | None = PROJECT_TO,
                 seed: int = 0, device: str | torch.device = "cpu"):
        if dim < 1 or classes < 1:
            raise ValueError(f"dim={dim}, classes={classes}; allowed: ints >= 1")
        if project_to is not None and project_to < 1:
            raise ValueError(f"project_to={project_to}; allowed: an int >= 1 or None")
        self.in_dim, self.classes, self.device = int(dim), int(classes), torch.device(device)
        self.dim = self.in_dim if project_to is None else min(self.in_dim, int(project_to))
        self._bucket: torch.Tensor | None = None
        self._sign: torch.Tensor | None = None
        if self.dim < self.in_dim:
            g = torch.Generator().manual_seed(int(seed))
            self._bucket = (torch.randperm(self.in_dim, generator=g) % self.dim).to(self.device)
            self._sign = (torch.randint(0, 2, (self.in_dim,), generator=g, dtype=torch.float64)
                          * 2 - 1).to(self.device)
        f64 = {"dtype": torch.float64, "device": self.device}
        self.n = 0
        self.sum = torch.zeros(self.dim, **f64)
        self.gram = torch.zeros(self.dim, self.dim, **f64)
        self.cross = torch.zeros(self.dim, self.classes, **f64)
        self.counts = torch.zeros(self.classes, **f64)

    @property
    def projected(self) -> bool:
        """Whether inputs are projected (``dim`` < ``in_dim``)."""
        return self._bucket is not None

    def project(self, x: Any) -> torch.Tensor:
        """:param x: [N x in_dim] (or [N x C x p x p]) features.
        :return: [N x dim] float64 on the probe's device (the projection, or the input)."""
        x = _as_tensor(x)
        x = x.reshape(len(x), -1).to(self.device, torch.float64)
        if x.shape[1] != self.in_dim:
            raise ValueError(f"rows of {x.shape[1]} features for a probe of {self.in_dim}")
        if self._bucket is None:
            return x
        out = torch.zeros(len(x), self.dim, dtype=torch.float64, device=self.device)
        return out.index_add_(1, self._bucket, x * self._sign)

    def update(self, x: Any, y: Any) -> None:
        """Add a batch. :param x: [N x dim] features (any trailing shape, flattened).
        :param y: [N] int labels in ``0..classes-1``."""
        z = self.project(x)
        y = _as_tensor(y).to(self.device, torch.int64).reshape(-1)
        if len(y) != len(z):
            raise ValueError(f"{len(z)} rows of features and {len(y)} labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.classes):
            raise ValueError(f"labels outside 0..{self.classes - 1}")
        self.n += len(z)
        self.sum += z.sum(dim=0)
        self.gram += z.T @ z
        self.cross.index_add_(1, y, z.T)  # column y_i += z_i: Z^T Y for one-hot Y
        self.counts += torch.bincount(y, minlength=self.classes).to(torch.float64)

    def solve(self, lambdas: Sequence[float] = LAMBDAS) -> RidgeSolution:
        """The ridge weights for every strength in ``lambdas`` (one eigendecomposition).

        :return: a :class:`RidgeSolution` ([L x D x C] weights on standardised inputs).
        """
        if self.n < 1:
            raise ValueError("the probe has seen no rows")
        lambdas = tuple(float(lam) for lam in lambdas)
        if not lambdas or any(not lam > 0 for lam in lambdas):
            raise ValueError(f"lambdas={list(lambdas)}; allowed: one or more numbers > 0")
        n = float(self.n)
        mean = self.sum / n
        cov = self.gram - n * torch.outer(mean, mean)  # centred Z^T Z
        var = torch.clamp(torch.diagonal(cov) / n, min=0.0)
        scale = torch.where(var > _EPS, var.sqrt(), torch.ones_like(var))
        inv = 1.0 / scale
        g = cov * inv[:, None] * inv[None, :]
        g = (g + g.T) / 2
        bias = self.counts / n
        b = (self.cross - torch.outer(self.sum, bias)) * inv[:, None]  # centred, scaled Z^T Y
        evals, evecs = torch.linalg.eigh(g)
        evals = torch.clamp(evals, min=0.0)
        vb = evecs.T @ b  # [D x C]
        alphas = torch.tensor(lambdas, dtype=torch.float64, device=self.device) * n
        weights = torch.stack([evecs @ (vb / (evals + a)[:, None]) for a in alphas])
        return RidgeSolution(lambdas, weights, mean, scale, bias, self)

    def score(self, x: Any, y: Any, lambdas: Sequence[float] = LAMBDAS) -> np.ndarray:
        """:return: [L] top-1 (%) on ``x`` [N x dim], ``y`` [N] of the weights solved now."""
        return self.solve(lambdas).score(x, y)


def _chunks(n: int, chunk: int):
    for at in range(0, n, chunk):
        yield slice(at, min(n, at + chunk))


def probe_scores(train_feats: Any, train_y: Any, val_feats: Any, val_y: Any, *,
                 classes: int | None = None, lambdas: Sequence[float] = LAMBDAS,
                 project_to: int | None = PROJECT_TO, seed: int = 0, chunk: int = CHUNK,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """Fit the ridge probe on a train sample, pick the strength on a val sample.

    The features are read ``chunk`` rows at a time (a memory-mapped array stays on disk).

    :param train_feats: [N x ...] features of the train sample (numpy, memmap or Tensor).
    :param train_y: [N] labels. ``val_feats`` [M x ...], ``val_y`` [M]: the val sample.
    :param classes: the number of classes (default: the largest label + 1).
    :return: ``lambda`` (the best strength on val; ties go to the stronger one),
        ``val_top1`` (%, that strength's), ``val_top1_by_lambda`` {lambda: %}, ``dim`` (the
        input width) and ``probe_dim`` (the width after the projection).
    """
    train_y, val_y = np.asarray(train_y, dtype=np.int64), np.asarray(val_y, dtype=np.int64)
    if classes is None:
        classes = int(max(train_y.max(initial=-1), val_y.max(initial=-1))) + 1
    dim = int(np.prod(train_feats.shape[1:]))
    ridge = StreamingRidge(dim, classes, project_to=project_to, seed=seed, device=device)
    for s in _chunks(len(train_y), chunk):
        ridge.update(train_feats[s], train_y[s])
    return score_solution(ridge, ((val_feats[s], val_y[s]) for s in _chunks(len(val_y), chunk)),
                          lambdas=lambdas)


def score_solution(ridge: StreamingRidge, val_batches: Any,
                   lambdas: Sequence[float] = LAMBDAS) -> dict[str, Any]:
    """Solve ``ridge`` for ``lambdas`` and score it on ``val_batches`` (an iterable of
    ``(x [N x ...], y [N])``): the dict :func:`probe_scores` returns."""
    sol = ridge.solve(lambdas)
    correct, total = np.zeros(len(sol.lambdas), dtype=np.int64), 0
    for x, y in val_batches:
        correct += sol.correct(x, y)
        total += len(y)
    top1 = 100.0 * correct / max(1, total)
    best = max(range(len(top1)), key=lambda i: (top1[i], sol.lambdas[i]))
    return {"lambda": sol.lambdas[best], "val_top1": float(top1[best]),
            "val_top1_by_lambda": {lam: float(s) for lam, s in zip(sol.lambdas, top1,
                                                                    strict=True)},
            "dim": ridge.in_dim, "probe_dim": ridge.dim}
