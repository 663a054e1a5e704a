"""Agreement between two sets of 4-level Soldati scores: the API's /agreement, `lusai eval`, CV.

Pure numpy, in the core because serving (reviews over REST) and training both report it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def quadratic_kappa(a: np.ndarray, b: np.ndarray, n_levels: int = 4) -> float:
    """Cohen's kappa with quadratic weights (Kqwc), the usual agreement measure for LUS scores."""
    a, b = np.asarray(a, int), np.asarray(b, int)
    obs = np.zeros((n_levels, n_levels))
    np.add.at(obs, (a, b), 1)
    w = (np.subtract.outer(np.arange(n_levels), np.arange(n_levels)) ** 2) / (n_levels - 1) ** 2
    exp = np.outer(obs.sum(1), obs.sum(0)) / max(obs.sum(), 1)
    denom = (w * exp).sum()
    return float(1 - (w * obs).sum() / denom) if denom else 1.0


@dataclass(frozen=True)
class Agreement:
    n: int
    kappa_quadratic: float
    exact: float
    within_one: float
    confusion: list[list[int]]  # rows = expert, columns = model


def agreement(expert: np.ndarray, model: np.ndarray) -> Agreement:
    expert, model = np.asarray(expert, int), np.asarray(model, int)
    conf = np.zeros((4, 4), int)
    np.add.at(conf, (expert, model), 1)
    return Agreement(
        n=int(expert.size),
        kappa_quadratic=round(quadratic_kappa(expert, model), 4),
        exact=round(float((expert == model).mean()), 4),
        within_one=round(float((np.abs(expert - model) <= 1).mean()), 4),
        confusion=conf.tolist(),
    )
