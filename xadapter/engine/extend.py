"""The spatial basis (or any per-site field) at new locations.

Each column of ``values`` (e.g. a basis column, or the per-site mean) is extended
from the fitted sites to new sites by a thin-plate spline in the same planar
coordinates as the penalty (DESIGN "Basis at new locations").

* :func:`thin_plate_extend`: global, exact, dense: SpatPCA's ``eigenFunction``.
  One ``(N + d + 1)`` system, factorised once for all columns. ``O(N^3)``; refused
  above :data:`GLOBAL_MAX_SITES`.
* :func:`local_extend`: ``scipy.interpolate.RBFInterpolator`` on the ``neighbors``
  nearest fitted sites of each new site, for large N.
* :func:`extend_basis`: picks one of the two by size.

Kernels are the Green's functions of the bending energy: ``r^3 / 12`` in 1-D,
``r^2 log r / (8 pi)`` in 2-D, ``-r / (8 pi)`` in 3-D, with a linear polynomial.

Smoothing
---------
``smoothing = lam >= 0`` fits the spline that minimises

    sum_i (f(s_i) - v_i)^2 + lam * J(f),

``J`` the bending energy, with the coordinates measured in units of the typical
site spacing ``h`` (by default the median nearest-neighbour distance of the
fitted sites). The number is therefore dimensionless and means the same on a
1 km and a 100 km network: ``lam = 0`` interpolates exactly; ``lam`` of order 0.1-1
damps wiggles at the scale of a few site spacings (useful for rough estimated
eigenvectors, DESIGN "Uncertainty at unseen sites"); ``lam -> inf`` tends to the
least-squares plane. Global and local versions use the same definition, so the
local version with ``neighbors >= N`` reproduces the global one.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
from scipy.interpolate import RBFInterpolator
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from .checks import nonnegative
from ..exceptions import CoordinateError, InputError, ProblemTooLargeError
from .geometry import check_duplicate_sites
from .geometry_cache import GEOMETRY_CACHE
from .penalty import thin_plate_kernel

#: Largest number of fitted sites for the global (dense) extension: an
#: ``(N + d + 1)`` square LU factorisation, about 130 MB and a few seconds at 4000.
GLOBAL_MAX_SITES = 4000

#: ``extend_basis(method="auto")`` uses the global extension up to this many fitted
#: sites and the local one above.
AUTO_LOCAL_ABOVE = 2000

#: Default number of nearest fitted sites used by the local extension.
DEFAULT_NEIGHBORS = 50

# scipy's kernels (r^3, r^2 log r, -r) are ours divided by these constants, so a
# smoothing lam in our units is lam / constant in scipy's.
_SCIPY_KERNEL = {1: "cubic", 2: "thin_plate_spline", 3: "linear"}
_KERNEL_CONSTANT = {1: 1.0 / 12.0, 2: 1.0 / (8.0 * np.pi), 3: 1.0 / (8.0 * np.pi)}

# Kernel entries evaluated per block when predicting (bounds memory at ~32 MB).
_BLOCK_ENTRIES = 4_000_000

METHODS = ("auto", "global", "local")


def _as_coords(coords, name, dim=None):
    coords = np.array(coords, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    if coords.ndim != 2 or coords.shape[1] not in (1, 2, 3):
        raise CoordinateError(
            f"{name} must have shape (N, d) with d in 1..3 (planar coordinates, e.g. km), "
            f"got shape {coords.shape}."
        )
    if dim is not None and coords.shape[1] != dim:
        raise CoordinateError(
            f"{name} has {coords.shape[1]} coordinate columns but the fitted sites have {dim}; "
            "give both in the same planar coordinate system."
        )
    bad = np.flatnonzero(~np.isfinite(coords).all(axis=1))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise CoordinateError(
            f"{name} are NaN or infinite at row(s) {shown}; drop those sites or give them "
            "valid coordinates."
        )
    return coords


def _prepare(new_coords, coords, values):
    """Validate inputs; return float64 arrays and whether ``values`` was 1-D."""
    coords = _as_coords(coords, "coords")
    n_sites, dim = coords.shape
    new_coords = _as_coords(new_coords, "new_coords", dim=dim)
    values = np.array(values, dtype=np.float64)
    given_shape = values.shape
    vector = values.ndim == 1
    if vector:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != n_sites:
        raise InputError(
            f"values must have shape (N,) or (N, K) with N = {n_sites} rows, one per fitted "
            f"site in coords; got shape {given_shape}."
        )
    if not np.isfinite(values).all():
        rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
        raise InputError(
            f"values are NaN or infinite at fitted site(s) {rows[:10].tolist()}; the "
            "spline needs a value at every site (drop those sites from coords and values)."
        )
    if n_sites < dim + 1:
        raise InputError(
            f"a thin-plate spline in {dim}-D needs at least {dim + 1} sites, got {n_sites}."
        )
    check_duplicate_sites(coords, what="planar")
    poly = np.hstack([np.ones((n_sites, 1)), coords - coords.mean(axis=0)])
    if np.linalg.matrix_rank(poly) < dim + 1:
        # sites on a line (a transect) or a plane: the spline lives in their own affine
        # span, and a new site takes the value at its projection onto that span
        coords, new_coords = _in_affine_span(coords, new_coords)  # duplicates are refused above
    return new_coords, coords, values, vector


def _in_affine_span(coords, new_coords):
    """Coordinates of the sites and the new sites along the principal axes the sites span."""
    centre = coords.mean(axis=0)
    _, singular, axes = np.linalg.svd(coords - centre, full_matrices=False)
    keep = singular > 1e-9 * max(float(singular.max()), np.finfo(float).tiny)
    axes = axes[keep]
    return (coords - centre) @ axes.T, (new_coords - centre) @ axes.T


def typical_spacing(coords):
    """Median nearest-neighbour distance of the sites (the smoothing length unit).

    Parameters
    ----------
    coords : array_like, shape (N, d)
        Planar coordinates.

    Returns
    -------
    float
        In the unit of ``coords``; 1.0 for a single site.
    """
    coords = _as_coords(coords, "coords")
    if coords.shape[0] < 2:
        return 1.0
    distance, _ = cKDTree(coords).query(coords, k=2)
    spacing = float(np.median(distance[:, 1]))
    return spacing if spacing > 0 else 1.0


def _scaling(coords, spacing):
    """Centre of the fitted sites and the length unit (``spacing``, by default theirs)."""
    if spacing is None:
        spacing = typical_spacing(coords)
    spacing = float(spacing)
    if not spacing > 0 or not np.isfinite(spacing):
        raise InputError(f"spacing must be a positive number, got {spacing}.")
    return coords.mean(axis=0), spacing


def _scaled(new_coords, coords, spacing):
    """Coordinates centred on the fitted sites and divided by the spacing."""
    centre, unit = _scaling(coords, spacing)
    return (new_coords - centre) / unit, (coords - centre) / unit


def _check_smoothing(smoothing):
    return nonnegative("smoothing", smoothing)


def thin_plate_extend(new_coords, coords, values, *, smoothing=0.0, spacing=None,
                      max_sites=GLOBAL_MAX_SITES):
    """Global thin-plate-spline extension of per-site values to new sites.

    The classical SpatPCA ``eigenFunction``: with ``smoothing = 0`` each column of
    ``values`` is interpolated exactly at the fitted sites by the thin-plate spline
    (kernel plus linear polynomial), and evaluated at ``new_coords``.

    Parameters
    ----------
    new_coords : array_like, shape (M, d) or (M,)
        Planar coordinates of the new sites, same system and unit as ``coords``.
    coords : array_like, shape (N, d) or (N,), d in 1..3
        Planar coordinates of the fitted sites (e.g. km). No duplicates.
    values : array_like, shape (N, K) or (N,)
        Per-site values, e.g. basis columns (dimensionless) or a site mean (data
        units). Must be finite.
    smoothing : float, default 0
        Weight of the bending energy against the squared misfit, with coordinates
        in units of ``spacing`` (module docstring). 0 interpolates exactly.
    spacing : float, optional
        Length unit of the smoothing, in the unit of ``coords``. Default: median
        nearest-neighbour distance of the fitted sites.
    max_sites : int
        Refuse more fitted sites than this (dense ``O(N^3)`` solve).

    Returns
    -------
    ndarray, shape (M, K) or (M,)
        Extended values, in the units of ``values``.

    Raises
    ------
    ProblemTooLargeError
        When ``N > max_sites``; use :func:`local_extend`.
    CoordinateError, InputError
        On NaN coordinates, mismatched shapes or dimensions, duplicate sites.
    """
    new_coords, coords, values, vector = _prepare(new_coords, coords, values)
    n_sites, dim = coords.shape
    if n_sites > max_sites:
        raise ProblemTooLargeError(
            f"the global thin-plate extension is dense and O(N^3): {n_sites} fitted sites "
            f"exceeds the limit of {max_sites}; use local_extend (or extend_basis with "
            "method='local'), which uses only the nearest fitted sites."
        )
    smoothing = _check_smoothing(smoothing)
    centre, unit, scaled, factor, pivots = _thin_plate_factor(coords, smoothing, spacing)
    new_scaled = (new_coords - centre) / unit
    rhs = np.zeros((n_sites + dim + 1, values.shape[1]))
    rhs[:n_sites] = values
    coefficients = sla.lu_solve((factor, pivots), rhs, check_finite=False)
    kernel_weights, poly_weights = coefficients[:n_sites], coefficients[n_sites:]

    result = np.empty((new_scaled.shape[0], values.shape[1]))
    block = max(1, _BLOCK_ENTRIES // n_sites)
    for start in range(0, new_scaled.shape[0], block):
        part = new_scaled[start:start + block]
        kernel = thin_plate_kernel(cdist(part, scaled), dim)
        result[start:start + block] = kernel @ kernel_weights + poly_weights[0] + part @ poly_weights[1:]
    return result[:, 0] if vector else result


def _thin_plate_factor(coords, smoothing, spacing):
    """The factorised thin-plate system of the fitted sites: ``(centre, unit, scaled
    coordinates, LU, pivots)``, cached by content (:mod:`xadapter.engine.geometry_cache`):
    the rank search and the site cross-validation extend every candidate's basis from
    the same sites, and the system's kernel and factorisation are most of an extension."""
    def compute():
        centre, unit = _scaling(coords, spacing)
        scaled = (coords - centre) / unit
        n_sites, dim = scaled.shape
        system = np.zeros((n_sites + dim + 1, n_sites + dim + 1))
        system[:n_sites, :n_sites] = thin_plate_kernel(cdist(scaled, scaled), dim)
        system[np.arange(n_sites), np.arange(n_sites)] += smoothing
        poly = np.hstack([np.ones((n_sites, 1)), scaled])
        system[:n_sites, n_sites:] = poly
        system[n_sites:, :n_sites] = poly.T
        factor, pivots = sla.lu_factor(system, overwrite_a=True, check_finite=False)
        return centre, np.array([unit]), scaled, factor, pivots

    size = coords.shape[0] + coords.shape[1] + 1
    key = GEOMETRY_CACHE.key("thin plate", coords, float(smoothing), None if spacing is None else float(spacing))
    centre, unit, scaled, factor, pivots = GEOMETRY_CACHE.get(key, 8 * size * (size + 1) + 8 * coords.size, compute)
    return centre, float(unit[0]), scaled, factor, pivots


def local_extend(new_coords, coords, values, neighbors=DEFAULT_NEIGHBORS, smoothing=0.0, *,
                 spacing=None):
    """Local thin-plate-spline extension for many fitted sites.

    Each new site gets the spline through its ``neighbors`` nearest fitted sites
    (``scipy.interpolate.RBFInterpolator`` with the kernel of
    :func:`thin_plate_extend` and a linear polynomial). Cost ``O(M neighbors^3)``,
    no ``N x N`` matrix. With ``neighbors >= N`` it equals :func:`thin_plate_extend`.

    Parameters
    ----------
    new_coords : array_like, shape (M, d) or (M,)
        Planar coordinates of the new sites.
    coords : array_like, shape (N, d) or (N,), d in 1..3
        Planar coordinates of the fitted sites (same unit).
    values : array_like, shape (N, K) or (N,)
        Per-site values to extend.
    neighbors : int, default 50
        Fitted sites used per new site; at least ``d + 2``.
    smoothing : float, default 0
        Bending-energy weight in units of the typical site spacing (module
        docstring); 0 interpolates exactly.
    spacing : float, optional
        Length unit of the smoothing (default: median nearest-neighbour distance).

    Returns
    -------
    ndarray, shape (M, K) or (M,)
    """
    new_coords, coords, values, vector = _prepare(new_coords, coords, values)
    n_sites, dim = coords.shape
    smoothing = _check_smoothing(smoothing)
    if neighbors is not None:
        if int(neighbors) != neighbors or neighbors < dim + 2:
            raise InputError(
                f"neighbors must be an integer >= {dim + 2} for a {dim}-D spline, got {neighbors!r}."
            )
        neighbors = None if neighbors >= n_sites else int(neighbors)
    new_scaled, scaled = _scaled(new_coords, coords, spacing)
    interpolator = RBFInterpolator(
        scaled, values, neighbors=neighbors, smoothing=smoothing / _KERNEL_CONSTANT[dim],
        kernel=_SCIPY_KERNEL[dim], degree=1,
    )
    result = interpolator(new_scaled) if new_scaled.shape[0] else np.empty((0, values.shape[1]))
    return result[:, 0] if vector else result


def extend_basis(new_coords, coords, values, method="auto", neighbors=DEFAULT_NEIGHBORS,
                 smoothing=0.0, *, spacing=None):
    """Extend basis columns (or any per-site field) to new sites.

    Parameters
    ----------
    new_coords, coords, values
        As in :func:`thin_plate_extend`.
    method : {"auto", "global", "local"}
        ``"auto"``: global exact spline up to :data:`AUTO_LOCAL_ABOVE` fitted sites,
        local above.
    neighbors : int, default 50
        Local method only.
    smoothing : float, default 0
        Bending-energy weight in units of the typical site spacing.
    spacing : float, optional
        Length unit of the smoothing.

    Returns
    -------
    ndarray, shape (M, K) or (M,)
    """
    if method not in METHODS:
        raise InputError(f"unknown extension method {method!r}; choose one of {METHODS}.")
    if method == "auto":
        method = "global" if np.shape(coords)[0] <= AUTO_LOCAL_ABOVE else "local"
    if method == "global":
        return thin_plate_extend(new_coords, coords, values, smoothing=smoothing, spacing=spacing)
    return local_extend(new_coords, coords, values, neighbors=neighbors, smoothing=smoothing,
                        spacing=spacing)
