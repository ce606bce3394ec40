"""Smoothness penalties ``Omega`` for the spatial basis.

Two penalties (DESIGN section 3):

* :func:`thin_plate`: the dense thin-plate bending-energy matrix used by SpatPCA,
  exact but ``O(N^3)``; refused above :data:`THIN_PLATE_MAX_SITES`.
* :func:`graph_laplacian`: the sparse Laplacian of a k-nearest-neighbour graph,
  ``O(N log N)`` to build, ``L`` (first order) or ``L @ L`` (second order, closer to the
  bending energy).

Normalisation (:func:`normalize_penalty`): the penalty is divided by its largest
eigenvalue, so that ``tr(Phi^T Omega Phi) <= K`` for any orthonormal ``Phi`` and
``tau1`` is compared with the data's own scale whatever the penalty, site spacing or
number of sites. :func:`build_penalty` builds and normalises in one call.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.spatial.distance import cdist

from ..exceptions import InputError, ProblemTooLargeError
from .geometry import knn_graph

#: Largest number of sites for which the dense thin-plate penalty is built
#: (an ``(N + d + 1)`` square inverse: about 0.3 GB and a few seconds at 4000).
THIN_PLATE_MAX_SITES = 4000

#: Number of sites above which ``build_penalty(kind="auto")`` picks the graph penalty.
AUTO_GRAPH_ABOVE = 1000

PENALTY_KINDS = ("graph", "tps", "auto")


def _as_coords(coords):
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    if coords.ndim != 2 or coords.shape[1] not in (1, 2, 3):
        raise InputError(f"coordinates must have shape (N, d) with d in 1..3, got {coords.shape}.")
    if not np.isfinite(coords).all():
        raise InputError("coordinates contain NaN or infinite values; drop or fix those sites.")
    return coords


def thin_plate_kernel(distance, dim):
    """Thin-plate spline radial kernel (Green's function of the bending energy).

    ``r^3 / 12`` in 1-D, ``r^2 log r / (8 pi)`` in 2-D, ``-r / (8 pi)`` in 3-D.

    Parameters
    ----------
    distance : ndarray
        Euclidean distances (any shape).
    dim : {1, 2, 3}
        Dimension of the coordinate space.
    """
    r = np.asarray(distance, dtype=np.float64)
    if dim == 1:
        return r**3 / 12.0
    if dim == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = r**2 * np.log(r) / (8.0 * np.pi)
        return np.where(r > 0, values, 0.0)
    if dim == 3:
        return -r / (8.0 * np.pi)
    raise InputError(f"thin-plate splines are defined here for 1 to 3 dimensions, got {dim}.")


def thin_plate_system(coords):
    """The ``(N + d + 1)`` square thin-plate interpolation system.

    ``[[K, P], [P^T, 0]]`` with ``K_ij = kernel(|s_i - s_j|)`` and ``P = [1, s]``.
    """
    coords = _as_coords(coords)
    n_sites, dim = coords.shape
    kernel = thin_plate_kernel(cdist(coords, coords), dim)
    poly = np.hstack([np.ones((n_sites, 1)), coords])
    system = np.zeros((n_sites + dim + 1, n_sites + dim + 1))
    system[:n_sites, :n_sites] = kernel
    system[:n_sites, n_sites:] = poly
    system[n_sites:, :n_sites] = poly.T
    return system


def thin_plate(coords, *, max_sites=THIN_PLATE_MAX_SITES):
    """Exact thin-plate bending-energy matrix (SpatPCA's ``Omega``), unscaled.

    ``phi^T Omega phi`` is the bending energy of the thin-plate spline through the
    values ``phi`` at the sites. With ``K`` the kernel matrix of
    :func:`thin_plate_kernel` and ``Z`` an orthonormal basis of the values that no
    polynomial of degree 1 takes at the sites (the complement of ``P = [1, s]``),

    ``Omega = Z (Z^T K Z)^{-1} Z^T``

    (Green and Silverman 1994, section 7.4): the top-left ``N x N`` block of the inverse
    of the system ``[[K, P], [P^T, 0]]`` of :func:`thin_plate_system`, which SpatPCA
    computes as ``inv(L + 1e-8 I)``. That inverse is ill-conditioned whenever the
    coordinates are far from unit scale (kernel entries ~1e7 against polynomial
    entries ~1e3 on a continent in km: reciprocal condition ~1e-18), which blurred the
    null space of linear functions; the reduced system ``Z^T K Z`` is positive definite
    and well scaled, and needs no ridge.

    Parameters
    ----------
    coords : array_like, shape (N,) or (N, d), d in 1..3
        Site coordinates in a planar system (e.g. km).
    max_sites : int
        Refuse larger problems (cost ``O(N^3)``, memory ``O(N^2)``).

    Returns
    -------
    ndarray, shape (N, N)
        Symmetric positive semi-definite; units of ``coords^(d-4)`` (not rescaled).
        Zero on values of polynomials of degree 1 (sites on a line in 2-D or a plane in
        3-D leave fewer such polynomials distinguishable, and the complement is taken
        of those that are).

    Raises
    ------
    ProblemTooLargeError
        When ``N > max_sites``; use ``graph_laplacian`` instead.
    """
    coords = _as_coords(coords)
    n_sites, dim = coords.shape
    if n_sites > max_sites:
        raise ProblemTooLargeError(
            f"the thin-plate penalty is dense and O(N^3): {n_sites} sites exceeds the limit "
            f"of {max_sites}; use penalty='graph' (sparse graph Laplacian) for large N."
        )
    # centred and scaled coordinates span the same polynomials, better conditioned
    centred = coords - coords.mean(axis=0)
    scale = np.abs(centred).max()
    polynomial = np.hstack([np.ones((n_sites, 1)), centred / (scale if scale > 0 else 1.0)])
    left, singular, _ = np.linalg.svd(polynomial, full_matrices=True)
    kept = int(np.sum(singular > singular[0] * max(polynomial.shape) * np.finfo(float).eps))
    complement = left[:, kept:]
    kernel = thin_plate_kernel(cdist(coords, coords), dim)
    reduced = complement.T @ kernel @ complement
    try:
        omega = complement @ sla.solve(0.5 * (reduced + reduced.T), complement.T, assume_a="pos")
    except np.linalg.LinAlgError as error:
        raise InputError(
            "the thin-plate system of these sites is singular (repeated sites?); "
            "merge duplicate sites or use penalty='graph'."
        ) from error
    return 0.5 * (omega + omega.T)


def graph_laplacian(coords, k=8, order=1, *, geographic=False, bandwidth=None):
    """Sparse Laplacian of the k-nearest-neighbour graph of the sites.

    Edge weights are Gaussian in the edge length, ``w = exp(-(length / h)^2)`` with
    ``h`` the median edge length unless given, so weights are bounded and do not
    depend on the unit of the coordinates.

    Parameters
    ----------
    coords : array_like, shape (N, d)
        Planar coordinates, or ``[lat, lon]`` in degrees when ``geographic``.
    k : int, default 8
        Neighbours per site (union-symmetrised, see :func:`geometry.knn_graph`).
    order : {1, 2}
        1 gives ``L = D - W``; 2 gives ``L @ L``.
    geographic : bool
        Coordinates are latitude/longitude; edge lengths are great-circle km.
    bandwidth : float, optional
        ``h`` in the unit of the edge lengths.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (N, N)
        Symmetric positive semi-definite, rows summing to zero (order 1).
    """
    if order not in (1, 2):
        raise InputError(f"order must be 1 or 2, got {order!r}.")
    coords = np.asarray(coords, dtype=np.float64)
    graph = knn_graph(coords, k=k, geographic=geographic)
    lengths = graph.data
    h = float(np.median(lengths)) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise InputError(f"bandwidth must be positive, got {h}.")
    weights = graph.copy()
    weights.data = np.exp(-((lengths / h) ** 2))
    degree = np.asarray(weights.sum(axis=1)).ravel()
    laplacian = (sp.diags(degree) - weights).tocsr()
    if order == 2:
        laplacian = (laplacian @ laplacian).tocsr()
    return laplacian


def largest_eigenvalue(omega):
    """Largest eigenvalue of a symmetric penalty, dense or sparse."""
    n = omega.shape[0]
    if sp.issparse(omega):
        if n < 200:
            return float(np.linalg.eigvalsh(omega.toarray())[-1])
        rng = np.random.default_rng(0)
        v0 = rng.standard_normal(n)
        return float(spla.eigsh(omega, k=1, which="LA", v0=v0, tol=1e-6, return_eigenvectors=False)[0])
    return float(sla.eigh(omega, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])


def normalize_penalty(omega):
    """Scale a penalty so that its largest eigenvalue is 1.

    Then ``0 <= tr(Phi^T Omega Phi) <= K`` for orthonormal ``Phi``, and ``tau1`` is
    measured against the eigenvalues of ``Dc^T Dc`` whatever penalty, site spacing or
    N produced ``Omega``.

    Parameters
    ----------
    omega : ndarray or scipy.sparse matrix, shape (N, N)

    Returns
    -------
    Same type as ``omega``, a new object.
    """
    top = largest_eigenvalue(omega)
    if not top > 0:
        raise InputError("the penalty has no positive eigenvalue; it cannot be normalised.")
    return omega / top


def build_penalty(coords, kind="auto", *, k=8, order=2, geographic=False):
    """Build a normalised smoothness penalty for the sites.

    Parameters
    ----------
    coords : array_like, shape (N, d)
        Planar coordinates in km (for ``"tps"``), or ``[lat, lon]`` degrees with
        ``geographic=True`` (graph penalty only; project first for ``"tps"``).
    kind : {"graph", "tps", "auto"}
        ``"auto"`` uses the thin-plate penalty up to :data:`AUTO_GRAPH_ABOVE` sites
        and the graph Laplacian above.
    k, order : int
        Graph penalty settings.

    Returns
    -------
    ndarray or scipy.sparse.csr_matrix, shape (N, N)
        Penalty with largest eigenvalue 1.
    """
    if kind not in PENALTY_KINDS:
        raise InputError(f"unknown penalty {kind!r}; choose one of {PENALTY_KINDS}.")
    n_sites = np.asarray(coords).shape[0]
    if kind == "auto":
        kind = "tps" if n_sites <= AUTO_GRAPH_ABOVE and not geographic else "graph"
    if kind == "tps":
        if geographic:
            raise InputError("the thin-plate penalty needs planar coordinates; project lat/lon first.")
        return normalize_penalty(thin_plate(coords))
    return normalize_penalty(graph_laplacian(coords, k=k, order=order, geographic=geographic))
