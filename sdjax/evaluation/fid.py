"""Frechet Inception Distance as pytorch-fid computes it.

Features: ``sdjax.models.inception.FIDInceptionV3`` (2048-d pool features of images in [0, 1]).
Statistics: the features' mean and covariance (N - 1) in float64, stored as pytorch-fid's
``.npz`` (``mu``, ``sigma``), so MLPerf's ``val2014_30k_stats.npz`` reads as is. Distance:
``pytorch_fid.fid_score.calculate_frechet_distance`` (its epsilon only when the product of the
covariances is singular, its check on the imaginary part).
"""

import dataclasses
import os

import numpy as np
from scipy import linalg


@dataclasses.dataclass(frozen=True)
class Statistics:
    """A feature set's mean (D,) and covariance (D, D), float64."""
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features_ND: np.ndarray) -> "Statistics":
        f = np.asarray(features_ND, np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"FID statistics need at least 2 feature vectors (N, D), got shape {f.shape}.")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False))

    def save(self, path: str) -> None:
        """pytorch-fid's ``--save-stats`` file (``np.savez_compressed`` with ``mu`` and ``sigma``)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.partial-{os.getpid()}.npz"
        np.savez_compressed(tmp, mu=self.mu, sigma=self.sigma)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Statistics":
        """A statistics ``.npz`` (pytorch-fid's or MLPerf's): ``mu`` (D,) and ``sigma`` (D, D); never unpickles."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such statistics file.")
        try:
            with np.load(path, allow_pickle=False) as f:
                names = list(f.files)
                arrays = {k: np.asarray(f[k], np.float64) for k in ("mu", "sigma") if k in names}
        except Exception as e:  # noqa: BLE001 - a bad zip, a truncated member, a pickled array refused
            raise ValueError(f"{path}: not a readable FID statistics .npz ({type(e).__name__}: {e}).") from e
        if len(arrays) < 2:
            raise ValueError(f"{path}: a FID statistics file holds arrays 'mu' and 'sigma'; this one has {names}.")
        mu, sigma = arrays["mu"], arrays["sigma"]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not describe one distribution "
                             "(expected (D,) and (D, D)).")
        return cls(mu, sigma)


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)), as pytorch-fid: ``eps`` is added to both
    diagonals only when the product's square root is not finite; an imaginary part larger than 1e-3
    on the diagonal is an error (the statistics are not covariances of one feature space)."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"FID compares statistics of the same features: got {a.mu.shape[0]}-d and "
                         f"{b.mu.shape[0]}-d means.")
    diff = a.mu - b.mu
    covmean = _sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.sigma.shape[0]) * eps
        print(f"fid: the product of the covariances is singular; adding {eps} to their diagonals", flush=True)
        covmean = _sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the square root of the covariances' product has an imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """scipy's matrix square root (the one pytorch-fid calls)."""
    with np.errstate(all="ignore"):
        return linalg.sqrtm(m)
