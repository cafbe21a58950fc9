"""Frechet Inception Distance as pytorch-fid computes it.

Features: ``sdjax.models.inception.FIDInceptionV3`` (2048-d pool features of images in [0, 1]).
Statistics: the features' mean and covariance (N - 1) in float64, stored as pytorch-fid's
``.npz`` (``mu``, ``sigma``), so MLPerf's ``val2014_30k_stats.npz`` reads as is. Distance:
``pytorch_fid.fid_score.calculate_frechet_distance``'s value, its matrix square root's trace taken
from the covariances' product's eigenvalues (``frechet_distance``).
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


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)), pytorch-fid's value. Its last trace is
    taken as the sum of the square roots of the eigenvalues of S_a S_b (a product of two
    covariances is similar to a symmetric positive semi-definite matrix, so its eigenvalues are real
    and >= 0 up to round-off): the trace of the ``scipy.linalg.sqrtm`` that pytorch-fid takes, to
    round-off, without forming the square root (docs/evaluation.md), and with no epsilon for singular
    covariances (pytorch-fid adds 1e-6 to the diagonals where its sqrtm is not finite). A square root
    with an imaginary part over 1e-3 is an error (the statistics are not covariances of one feature
    space), as in pytorch-fid."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"FID compares statistics of the same features: got {a.mu.shape[0]}-d and "
                         f"{b.mu.shape[0]}-d means.")
    if not all(np.isfinite(x).all() for x in (a.mu, a.sigma, b.mu, b.sigma)):
        raise ValueError("FID: the statistics hold NaN or infinite values; recompute them from the images.")
    roots = np.sqrt(linalg.eigvals(a.sigma @ b.sigma).astype(np.complex128))
    if np.abs(roots.imag).max() > 1e-3:
        raise ValueError(f"FID: the square root of the covariances' product has an imaginary component "
                         f"{np.abs(roots.imag).max():.3g}.")
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * roots.real.sum())
