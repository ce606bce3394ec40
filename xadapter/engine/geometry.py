"""Site geometry: validation, sphere and planar coordinates, neighbour graphs.

Latitudes and longitudes are in degrees; distances are in kilometres. Longitudes may
use either convention (-180..180 or 0..360) and domains may cross the dateline: every
function here works on 3-D unit-sphere coordinates or on a projection centred on the
domain, so the convention never matters.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from pyproj import Transformer
from scipy.spatial import cKDTree

from ..exceptions import CoordinateError, DuplicateSiteError, InputError

#: Mean Earth radius (IUGG), km.
EARTH_RADIUS_KM = 6371.0088

#: Two sites closer than this fraction of the coordinate scale (the largest absolute
#: coordinate; 1 on the unit sphere) are the same point. Float64 coordinates carry
#: about 1e-16 relative rounding, so 1e-12 is far above rounding while far below any
#: real station spacing (6 micrometres on the Earth's surface).
DUPLICATE_RELATIVE_TOLERANCE = 1e-12

#: Above this angular radius (degrees from the domain centre) a single azimuthal
#: projection distorts too much and planar work uses 3-D chordal coordinates instead.
GLOBAL_DOMAIN_DEGREES = 60.0


def _as_vector(values, name):
    array = np.array(values, dtype=np.float64)
    if array.ndim != 1:
        array = array.reshape(-1) if array.size == array.shape[0] else array
    if array.ndim != 1:
        raise CoordinateError(f"{name} must be one-dimensional, got shape {array.shape}.")
    return array


def validate_latlon(lat, lon, *, allow_duplicates=False):
    """Check geographic site coordinates and return them as float64 vectors.

    Parameters
    ----------
    lat, lon : array_like, shape (N,)
        Latitude and longitude of each site, degrees. Longitudes in -180..180 or
        0..360 are both accepted.
    allow_duplicates : bool, default False
        Skip the duplicate-site check (for target locations that may repeat).

    Returns
    -------
    lat, lon : ndarray of float64, shape (N,)
        Copies of the inputs; the longitude convention is left as given.

    Raises
    ------
    CoordinateError
        On NaN or infinite coordinates, mismatched lengths, a latitude outside
        [-90, 90] or a longitude outside [-360, 360].
    DuplicateSiteError
        When two sites are the same point on the sphere.
    """
    lat = _as_vector(lat, "latitude")
    lon = _as_vector(lon, "longitude")
    if lat.shape != lon.shape:
        raise CoordinateError(
            f"latitude and longitude have different lengths ({lat.size} and {lon.size}); "
            "give one latitude and one longitude per site."
        )
    for name, values in (("latitude", lat), ("longitude", lon)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise CoordinateError(
                f"{name} is NaN or infinite at site indices {_short_list(bad)}; "
                "drop those sites or give them valid coordinates."
            )
    bad = np.flatnonzero(np.abs(lat) > 90.0)
    if bad.size:
        raise CoordinateError(
            f"latitude out of range [-90, 90] at site indices {_short_list(bad)} "
            f"(e.g. {lat[bad[0]]:g}); check that latitude and longitude are not swapped "
            "and that the values are in degrees."
        )
    bad = np.flatnonzero(np.abs(lon) > 360.0)
    if bad.size:
        raise CoordinateError(
            f"longitude out of range [-360, 360] at site indices {_short_list(bad)} "
            f"(e.g. {lon[bad[0]]:g}); longitudes must be in degrees."
        )
    if not allow_duplicates:
        check_duplicate_sites(sphere_xyz(lat, lon), what="geographic")
    return lat, lon


def _short_list(indices, limit=10):
    indices = [int(i) for i in np.asarray(indices).ravel()]
    text = ", ".join(str(i) for i in indices[:limit])
    if len(indices) > limit:
        text += f", ... ({len(indices)} in all)"
    return "[" + text + "]"


def validate_planar(coords, *, allow_duplicates=False):
    """Check projected (planar) site coordinates.

    Parameters
    ----------
    coords : array_like, shape (N,) or (N, d)
        Site coordinates in a planar system (e.g. metres or km), d in 1..3.

    Returns
    -------
    ndarray of float64, shape (N, d)
    """
    coords = np.array(coords, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    if coords.ndim != 2 or coords.shape[1] not in (1, 2, 3):
        raise CoordinateError(
            f"planar coordinates must have shape (N, d) with d in 1..3, got {coords.shape}."
        )
    bad = np.flatnonzero(~np.isfinite(coords).all(axis=1))
    if bad.size:
        raise CoordinateError(
            f"coordinates are NaN or infinite at site indices {_short_list(bad)}; "
            "drop those sites or give them valid coordinates."
        )
    if not allow_duplicates:
        check_duplicate_sites(coords, what="planar")
    return coords


def check_duplicate_sites(coords, *, what="planar", tolerance=None):
    """Raise :class:`DuplicateSiteError` if two rows of ``coords`` coincide.

    Parameters
    ----------
    coords : array_like, shape (N, d)
        Site coordinates (planar, or 3-D unit-sphere coordinates).
    tolerance : float, optional
        Distance under which two sites count as the same. Default:
        :data:`DUPLICATE_RELATIVE_TOLERANCE` of the coordinate scale (about 6
        micrometres on the unit sphere of the Earth): only the same point, up to
        float64 rounding of the coordinates, is a duplicate; two stations 1 mm apart
        are distinct sites (the fit handles them, see the tests of near-duplicates).
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    if coords.shape[0] < 2:
        return
    if tolerance is None:
        scale = float(np.max(np.abs(coords))) or 1.0
        tolerance = DUPLICATE_RELATIVE_TOLERANCE * scale
    pairs = cKDTree(coords).query_pairs(r=tolerance, output_type="ndarray")
    if len(pairs):
        shown = ", ".join(f"({int(a)}, {int(b)})" for a, b in pairs[:5])
        more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
        raise DuplicateSiteError(
            f"duplicate sites: {what} coordinates coincide for site index pairs "
            f"{shown}{more}; average or drop repeated stations before fitting."
        )


def sphere_xyz(lat, lon):
    """Unit-sphere Cartesian coordinates of geographic sites.

    Parameters
    ----------
    lat, lon : array_like, shape (N,)
        Degrees.

    Returns
    -------
    ndarray, shape (N, 3)
        Points on the unit sphere (dimensionless).
    """
    lat = np.deg2rad(np.asarray(lat, dtype=np.float64))
    lon = np.deg2rad(np.asarray(lon, dtype=np.float64))
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)


def great_circle_km(lat1, lon1, lat2, lon2):
    """Great-circle distance on a sphere of radius :data:`EARTH_RADIUS_KM`.

    Uses the haversine formula, accurate at short and long range. Inputs broadcast.

    Returns
    -------
    ndarray
        Distance in km.
    """
    phi1, phi2 = np.deg2rad(lat1), np.deg2rad(lat2)
    dphi = phi2 - phi1
    dlam = np.deg2rad(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    h = np.sin(dphi / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(dlam / 2) ** 2
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def chord_to_great_circle_km(chord):
    """Convert chordal distance on the unit sphere to great-circle km."""
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord) / 2.0, 0.0, 1.0))


def domain_centre(lat, lon):
    """Centre of a set of sites: the normalised mean of their unit vectors.

    Returns
    -------
    (float, float)
        Latitude and longitude of the centre, degrees (longitude in -180..180).
    """
    xyz = sphere_xyz(lat, lon).mean(axis=0)
    norm = np.linalg.norm(xyz)
    if norm < 1e-12:  # sites spread evenly over the sphere
        return 0.0, 0.0
    x, y, z = xyz / norm
    return float(np.rad2deg(np.arcsin(z))), float(np.rad2deg(np.arctan2(y, x)))


def local_projection_km(lat, lon, centre=None):
    """Azimuthal equidistant projection centred on the domain, in km.

    Distances from the centre are exact and distortion stays small over regional
    domains, which is what thin-plate interpolation needs.

    Parameters
    ----------
    lat, lon : array_like, shape (N,)
        Degrees.
    centre : (float, float), optional
        (lat, lon) of the projection centre. Default: :func:`domain_centre`.

    Returns
    -------
    ndarray, shape (N, 2)
        Easting and northing, km.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    lat0, lon0 = domain_centre(lat, lon) if centre is None else centre
    transformer = _aeqd_transformer(round(lat0, 9), round(lon0, 9))
    x, y = transformer.transform(lon, lat)
    return np.stack([np.asarray(x) / 1000.0, np.asarray(y) / 1000.0], axis=-1)


@lru_cache(maxsize=32)
def _aeqd_transformer(lat0, lon0):
    proj = f"+proj=aeqd +lat_0={lat0} +lon_0={lon0} +datum=WGS84 +units=m +no_defs"
    return Transformer.from_crs("EPSG:4326", proj, always_xy=True)


def angular_radius_deg(lat, lon, centre=None):
    """Largest angular distance (degrees) of any site from the domain centre."""
    lat0, lon0 = domain_centre(lat, lon) if centre is None else centre
    dist = great_circle_km(lat0, lon0, lat, lon)
    return float(np.rad2deg(np.max(dist) / EARTH_RADIUS_KM)) if np.size(dist) else 0.0


def planar_coords_km(lat, lon, centre=None):
    """Planar coordinates for thin-plate work, in km.

    Regional domains (every site within :data:`GLOBAL_DOMAIN_DEGREES` of the centre)
    get the 2-D :func:`local_projection_km`; near-global domains get 3-D chordal
    coordinates (unit-sphere coordinates times the Earth radius).

    Returns
    -------
    ndarray, shape (N, 2) or (N, 3)
    """
    if centre is None:
        centre = domain_centre(lat, lon)
    if angular_radius_deg(lat, lon, centre) > GLOBAL_DOMAIN_DEGREES:
        return EARTH_RADIUS_KM * sphere_xyz(lat, lon)
    return local_projection_km(lat, lon, centre)


def knn_graph(coords, k=8, *, geographic=False):
    """Symmetric k-nearest-neighbour graph with edge lengths.

    Parameters
    ----------
    coords : array_like, shape (N, d)
        Planar coordinates (any unit), or ``[lat, lon]`` columns in degrees when
        ``geographic`` is true.
    k : int, default 8
        Number of neighbours of each site. An edge is kept if either end counts the
        other among its ``k`` nearest (union), so the graph is symmetric.
    geographic : bool, default False
        Treat ``coords`` as latitude/longitude: neighbours are searched with a
        ``cKDTree`` on unit-sphere coordinates and edges get great-circle lengths.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (N, N)
        Edge lengths (km when geographic, else the unit of ``coords``); zero
        diagonal; about ``N * k`` stored entries, never a dense N x N array.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    n_sites = coords.shape[0]
    if n_sites < 2:
        raise InputError("a neighbour graph needs at least 2 sites.")
    if int(k) < 1:
        raise InputError(f"k must be a positive number of neighbours, got {k}.")
    k = min(int(k), n_sites - 1)
    if geographic:
        if coords.shape[1] != 2:
            raise CoordinateError("geographic coordinates must have two columns [lat, lon].")
        points = sphere_xyz(coords[:, 0], coords[:, 1])
    else:
        points = coords
    _, neighbours = cKDTree(points).query(points, k=k + 1)
    rows = np.repeat(np.arange(n_sites), k)
    cols = neighbours[:, 1:].ravel()
    if geographic:
        lengths = great_circle_km(coords[rows, 0], coords[rows, 1], coords[cols, 0], coords[cols, 1])
    else:
        lengths = np.linalg.norm(points[rows] - points[cols], axis=1)
    graph = sp.coo_matrix((lengths, (rows, cols)), shape=(n_sites, n_sites)).tocsr()
    graph = graph.maximum(graph.T).tocsr()
    graph.setdiag(0.0)
    graph.eliminate_zeros()
    if graph.nnz < n_sites - 1:
        raise DuplicateSiteError(
            "the neighbour graph has zero-length edges: some sites coincide; "
            "remove duplicate sites before building a penalty."
        )
    return graph
