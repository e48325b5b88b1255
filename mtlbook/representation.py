r"""The geometry of a learned feature space (chapter 2): a PCA projection and how well it separates classes."""

from __future__ import annotations

import numpy as np

__all__ = ["class_separation", "pca_projection"]


def pca_projection(features: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Principal-component coordinates ``[n, n_components]`` and each component's share of the variance.

    Computed by SVD of the centred features; each component's sign is fixed so that its
    largest-magnitude loading is positive, which makes the picture repeatable.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, d], got shape {x.shape}")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not 1 <= n_components <= min(x.shape):
        raise ValueError(f"n_components must be an int in 1..{min(x.shape)}, got {n_components!r}")
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
    vt = vt * signs[:, None]
    variance = singular**2
    share = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    return centred @ vt[:n_components].T, share[:n_components]


def class_separation(coordinates: np.ndarray, labels: np.ndarray) -> float:
    """Correlation ratio :math:`\\eta^2`: between-class sum of squares over total, in [0, 1].

    1 means every class sits on a single point; 0 means all class means coincide.
    """
    x = np.asarray(coordinates, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.size or y.size < 2:
        raise ValueError("coordinates must be [n, d] (n >= 2) with one label per row")
    centred = x - x.mean(axis=0)
    total = float((centred**2).sum())
    if total == 0:
        return 0.0
    between = sum(float((y == k).sum()) * float((centred[y == k].mean(axis=0) ** 2).sum()) for k in np.unique(y))
    return between / total
