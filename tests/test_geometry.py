import numpy as np
import pytest

from xadapter.engine import geometry
from xadapter.exceptions import CoordinateError, DuplicateSiteError, InputError


def test_sphere_xyz_unit_and_known_points():
    xyz = geometry.sphere_xyz([0.0, 90.0, 0.0], [0.0, 0.0, 90.0])
    np.testing.assert_allclose(xyz, [[1, 0, 0], [0, 0, 1], [0, 1, 0]], atol=1e-15)
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)
    np.testing.assert_allclose(np.linalg.norm(geometry.sphere_xyz(lat, lon), axis=1), 1.0)


def test_great_circle_against_pyproj_geod_sphere():
    from pyproj import Geod

    rng = np.random.default_rng(1)
    lat1, lon1 = rng.uniform(-80, 80, 100), rng.uniform(-180, 180, 100)
    lat2, lon2 = rng.uniform(-80, 80, 100), rng.uniform(-180, 180, 100)
    geod = Geod(a=geometry.EARTH_RADIUS_KM * 1000, b=geometry.EARTH_RADIUS_KM * 1000)
    _, _, dist_m = geod.inv(lon1, lat1, lon2, lat2)
    np.testing.assert_allclose(geometry.great_circle_km(lat1, lon1, lat2, lon2), dist_m / 1000, rtol=1e-9)
    # a quarter meridian
    np.testing.assert_allclose(geometry.great_circle_km(0, 0, 90, 0), np.pi / 2 * geometry.EARTH_RADIUS_KM)


@pytest.mark.parametrize(
    "lat, lon, message",
    [
        ([0.0, np.nan], [0.0, 1.0], "NaN"),
        ([0.0, 91.0], [0.0, 1.0], "latitude out of range"),
        ([0.0, 1.0], [0.0, 400.0], "longitude out of range"),
        ([0.0, 1.0, 2.0], [0.0, 1.0], "different lengths"),
    ],
)
def test_validate_latlon_errors(lat, lon, message):
    with pytest.raises(CoordinateError, match=message):
        geometry.validate_latlon(lat, lon)


def test_duplicate_sites_named_including_longitude_convention():
    lat = [10.0, 20.0, 10.0, 30.0]
    lon = [-170.0, 5.0, 190.0, 7.0]  # -170 and 190 are the same meridian
    with pytest.raises(DuplicateSiteError, match=r"\(0, 2\)"):
        geometry.validate_latlon(lat, lon)
    # both poles with different longitudes are duplicates too
    with pytest.raises(DuplicateSiteError):
        geometry.validate_latlon([90.0, 90.0], [0.0, 45.0])
    assert isinstance(DuplicateSiteError("x"), ValueError)


def test_validate_latlon_returns_copies():
    lat = np.array([1.0, 2.0])
    out_lat, _ = geometry.validate_latlon(lat, np.array([3.0, 4.0]))
    out_lat[0] = 99.0
    assert lat[0] == 1.0


def _graph_pairs(graph):
    coo = graph.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist())), coo


def test_knn_graph_same_across_longitude_conventions_and_dateline():
    rng = np.random.default_rng(2)
    lat = rng.uniform(-20, 20, 300)
    lon_180 = rng.uniform(160, 200, 300)  # straddles the dateline
    lon_180 = np.where(lon_180 > 180, lon_180 - 360, lon_180)
    lon_360 = np.mod(lon_180, 360.0)
    g1 = geometry.knn_graph(np.column_stack([lat, lon_180]), k=6, geographic=True)
    g2 = geometry.knn_graph(np.column_stack([lat, lon_360]), k=6, geographic=True)
    assert (g1 != g2).nnz == 0 or np.allclose(g1.toarray(), g2.toarray())
    pairs, coo = _graph_pairs(g1)
    # symmetric, no self loops, every site has at least k neighbours
    assert all((j, i) in pairs for i, j in pairs)
    assert not np.any(coo.row == coo.col)
    assert np.all(np.diff(g1.indptr) >= 6)
    # edges across the dateline are short (great-circle), not ~360 degrees long
    assert g1.data.max() < 2000.0
    # lengths are great-circle distances
    np.testing.assert_allclose(
        coo.data, geometry.great_circle_km(lat[coo.row], lon_180[coo.row], lat[coo.col], lon_180[coo.col])
    )


def test_knn_graph_planar_matches_brute_force():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (200, 2))
    graph = geometry.knn_graph(xy, k=4)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = np.argsort(dist, axis=1)[:, :4]
    dense = graph.toarray()
    for i in range(200):
        for j in nearest[i]:
            assert dense[i, j] == pytest.approx(dist[i, j])
            assert dense[j, i] == pytest.approx(dist[i, j])
    with pytest.raises(InputError, match="positive"):
        geometry.knn_graph(xy, k=0)


def test_local_projection_preserves_distances_regionally():
    rng = np.random.default_rng(4)
    lat, lon = rng.uniform(30, 40, 100), rng.uniform(-110, -100, 100)
    xy = geometry.local_projection_km(lat, lon)
    lat0, lon0 = geometry.domain_centre(lat, lon)
    # distances from the centre are exact on the ellipsoid (within 0.5 % of the sphere)
    from_centre = np.linalg.norm(xy, axis=1)
    np.testing.assert_allclose(from_centre, geometry.great_circle_km(lat0, lon0, lat, lon), rtol=5e-3)
    # pairwise distances within ~1 % over a 10-degree box
    i, j = rng.integers(0, 100, (2, 300))
    keep = i != j
    planar = np.linalg.norm(xy[i[keep]] - xy[j[keep]], axis=1)
    sphere = geometry.great_circle_km(lat[i[keep]], lon[i[keep]], lat[j[keep]], lon[j[keep]])
    np.testing.assert_allclose(planar, sphere, rtol=1.5e-2)


def test_projection_invariant_to_longitude_convention_across_dateline():
    lat = np.array([-5.0, 0.0, 5.0, 2.0])
    lon = np.array([175.0, -178.0, 179.0, -175.0])
    xy1 = geometry.local_projection_km(lat, lon)
    xy2 = geometry.local_projection_km(lat, np.mod(lon, 360))
    np.testing.assert_allclose(xy1, xy2, atol=1e-6)
    assert np.abs(xy1[:, 0]).max() < 1000.0


def test_planar_coords_switch_to_chordal_for_global_domains():
    rng = np.random.default_rng(5)
    lat, lon = rng.uniform(-80, 80, 100), rng.uniform(-180, 180, 100)
    coords = geometry.planar_coords_km(lat, lon)
    assert coords.shape == (100, 3)
    np.testing.assert_allclose(np.linalg.norm(coords, axis=1), geometry.EARTH_RADIUS_KM)
    regional = geometry.planar_coords_km(lat / 10, lon / 10)
    assert regional.shape == (100, 2)
