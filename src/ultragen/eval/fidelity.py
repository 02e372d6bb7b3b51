"""FID and IS from features already extracted (``ultragen.eval.inception``), computed by torchmetrics: its metrics
are fed an identity "network", so each image passes the Inception net once for both FID and IS."""

from __future__ import annotations

import warnings

import torch


class _Given(torch.nn.Module):
    """Identity: torchmetrics' ``feature`` network for features computed beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def check_fid_samples(n_generated: int, n_reference: int, feature_dim: int, label: str) -> None:
    """FID fits a Gaussian to each set; n samples give a covariance of rank at most n - 1, so a full-rank covariance
    of ``feature_dim`` features needs n >= feature_dim + 1 in both sets."""
    need = feature_dim + 1
    for name, n, unit in (("generated", n_generated, label), ("reference", n_reference, label)):
        if n < need:
            raise ValueError(
                f"{'fid_patch' if label == 'patches' else 'fid'}: {n} {name} {unit} give a covariance of rank at "
                f"most {n - 1} < {feature_dim} Inception features; FID needs at least {need} per set for a "
                f"full-rank covariance: add {unit}"
                + (", raise --patches-per-image" if label == "patches" else "")
                + (f", or pass --fid-features {_smaller(feature_dim, n)}" if _smaller(feature_dim, n) else ""))


def _smaller(feature_dim: int, n: int) -> int | None:
    from ultragen.eval.config import INCEPTION_FEATURE_DIMS

    fitting = [d for d in INCEPTION_FEATURE_DIMS if d < feature_dim and d + 1 <= n]
    return max(fitting) if fitting else None


def frechet_distance(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """FID between two feature sets [N, D] and [M, D] (float64 statistics, torchmetrics' FrechetInceptionDistance)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Given(generated.shape[1]))
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


def check_is_samples(n: int, splits: int, label: str) -> None:
    if n < splits:
        raise ValueError(f"{'is_patch' if label == 'patches' else 'is'}: {n} {label} cannot fill {splits} splits "
                         f"(the score is averaged over splits of the set); add {label} or pass --is-splits {n}")


def inception_score(logits: torch.Tensor, splits: int, seed: int) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))) from logits [N, K] (torchmetrics'
    InceptionScore, which shuffles before splitting: the shuffle is seeded here)."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metric = InceptionScore(feature=_Given(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom is <= 0.*")  # one split: no std
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0
