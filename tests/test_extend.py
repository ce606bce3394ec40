import numpy as np
import pytest

from xadapter.engine import extend
from xadapter.exceptions import (
    CoordinateError,
    DuplicateSiteError,
    InputError,
    ProblemTooLargeError,
)


def smooth_field(coords):
    x, y = coords[:, 0], coords[:, 1]
    return np.column_stack([np.sin(x / 4.0) * np.cos(y / 5.0), np.exp(-((x - 5) ** 2 + (y - 5) ** 2) / 30.0)])


@pytest.fixture
def scattered():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 10, (400, 2))
    new = rng.uniform(1, 9, (150, 2))
    return coords, new


@pytest.mark.parametrize(
    "coords",
    [
        [(-5, -5), (5, -5), (-5, 5), (5, 5)],  # expand.grid order (x varies fastest)
        [(-5, -5), (-5, 5), (5, -5), (5, 5)],  # y fastest: same interpolant of e1
    ],
)
def test_global_extension_matches_spatpca_eigenfunction_value(coords):
    # SpatPCA's test suite: eigenFunction of e1 on the 4-corner grid at (0.1, 0.2)
    value = extend.thin_plate_extend([[0.1, 0.2]], np.array(coords, float), [1.0, 0.0, 0.0, 0.0])
    assert value.shape == (1,)
    assert value[0] == pytest.approx(0.2352884, abs=1e-6)


def test_local_with_all_sites_matches_spatpca_value():
    coords = np.array([(-5, -5), (5, -5), (-5, 5), (5, 5)], float)
    value = extend.local_extend([[0.1, 0.2]], coords, np.eye(4)[:, :1], neighbors=None)
    assert value.shape == (1, 1)
    assert value[0, 0] == pytest.approx(0.2352884, abs=1e-6)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_exact_interpolation_at_training_sites(dim):
    rng = np.random.default_rng(dim)
    coords = rng.uniform(-3, 3, (120, dim))
    if dim == 1:
        # the cubic system's conditioning grows like (range / closest gap)^3: keep gaps sane
        coords = np.linspace(-3, 3, 120)[:, None] + rng.uniform(-0.01, 0.01, (120, 1))
    values = rng.standard_normal((120, 4))  # rough on purpose
    scale = np.abs(values).max()
    np.testing.assert_allclose(extend.thin_plate_extend(coords, coords, values), values, atol=1e-8 * scale)
    np.testing.assert_allclose(
        extend.local_extend(coords, coords, values, neighbors=30, smoothing=0.0), values, atol=1e-8 * scale
    )


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("method", ["global", "local"])
def test_linear_function_reproduced_exactly(dim, method):
    rng = np.random.default_rng(10 + dim)
    coords = rng.uniform(0, 100, (200, dim))
    new = rng.uniform(-20, 120, (60, dim))  # including extrapolation
    slope = np.arange(1.0, dim + 1.0)
    values = 3.0 + coords @ slope
    # with smoothing too: a linear function has zero bending energy and zero misfit
    for smoothing in (0.0, 2.0):
        result = extend.extend_basis(new, coords, values, method=method, neighbors=25, smoothing=smoothing)
        np.testing.assert_allclose(result, 3.0 + new @ slope, atol=1e-7 * 100 * slope.sum())


def test_local_agrees_with_global_on_smooth_field(scattered):
    coords, new = scattered
    values = smooth_field(coords)
    truth = smooth_field(new)
    global_ = extend.thin_plate_extend(new, coords, values)
    local = extend.local_extend(new, coords, values, neighbors=50)
    # both are good interpolants of the truth and close to each other
    assert np.abs(global_ - truth).max() < 0.02
    assert np.abs(local - global_).max() < 0.005
    assert np.sqrt(np.mean((local - global_) ** 2)) < 1e-3


@pytest.mark.parametrize("smoothing", [0.0, 0.3, 3.0])
def test_local_with_all_neighbours_equals_global_including_smoothing(scattered, smoothing):
    coords, new = scattered
    values = smooth_field(coords)
    np.testing.assert_allclose(
        extend.local_extend(new, coords, values, neighbors=len(coords), smoothing=smoothing),
        extend.thin_plate_extend(new, coords, values, smoothing=smoothing),
        atol=1e-9,
    )


def test_smoothing_is_independent_of_the_coordinate_unit(scattered):
    # the smoothing length unit is the site spacing, so km vs m gives the same spline
    coords, new = scattered
    values = smooth_field(coords)
    km = extend.thin_plate_extend(new, coords, values, smoothing=0.5)
    metres = extend.thin_plate_extend(new * 1000.0, coords * 1000.0, values, smoothing=0.5)
    np.testing.assert_allclose(km, metres, atol=1e-9)


def test_smoothing_reduces_noise_and_roughness(scattered):
    coords, new = scattered
    rng = np.random.default_rng(5)
    truth = smooth_field(coords)[:, 0]
    noisy = truth + 0.2 * rng.standard_normal(truth.shape)
    exact = extend.thin_plate_extend(new, coords, noisy)
    smoothed = extend.thin_plate_extend(new, coords, noisy, smoothing=1.0)
    target = smooth_field(new)[:, 0]
    assert np.sqrt(np.mean((smoothed - target) ** 2)) < 0.6 * np.sqrt(np.mean((exact - target) ** 2))
    at_sites = extend.thin_plate_extend(coords, coords, noisy, smoothing=1.0)
    assert np.abs(at_sites - noisy).max() > 0.05  # no longer interpolates
    # huge smoothing tends to the least-squares plane
    design = np.column_stack([np.ones(len(coords)), coords])
    plane = design @ np.linalg.lstsq(design, noisy, rcond=None)[0]
    flat = extend.thin_plate_extend(coords, coords, noisy, smoothing=1e9)
    np.testing.assert_allclose(flat, plane, atol=1e-4)


def test_auto_dispatch_by_size(monkeypatch):
    rng = np.random.default_rng(2)
    coords = rng.uniform(0, 10, (60, 2))
    values = smooth_field(coords)
    new = rng.uniform(1, 9, (10, 2))
    called = []
    monkeypatch.setattr(extend, "AUTO_LOCAL_ABOVE", 50)
    original = extend.local_extend
    monkeypatch.setattr(extend, "local_extend", lambda *a, **k: called.append(1) or original(*a, **k))
    extend.extend_basis(new, coords, values, neighbors=20)
    assert called
    monkeypatch.setattr(extend, "AUTO_LOCAL_ABOVE", 100)
    called.clear()
    np.testing.assert_allclose(
        extend.extend_basis(new, coords, values), extend.thin_plate_extend(new, coords, values)
    )
    assert not called


def test_global_refuses_too_many_sites():
    coords = np.random.default_rng(0).uniform(0, 1, (30, 2))
    with pytest.raises(ProblemTooLargeError, match="local_extend"):
        extend.thin_plate_extend(coords[:2], coords, coords[:, 0], max_sites=20)
    assert extend.GLOBAL_MAX_SITES >= 1000


def test_validation_errors():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1, (20, 2))
    values = rng.standard_normal((20, 3))
    new = rng.uniform(0, 1, (5, 2))
    bad = coords.copy()
    bad[3, 1] = np.nan
    with pytest.raises(CoordinateError, match=r"coords are NaN.*row\(s\) 3"):
        extend.thin_plate_extend(new, bad, values)
    bad_new = new.copy()
    bad_new[4, 0] = np.inf
    with pytest.raises(CoordinateError, match=r"new_coords are NaN.*row\(s\) 4"):
        extend.local_extend(bad_new, coords, values)
    with pytest.raises(CoordinateError, match="3 coordinate columns"):
        extend.thin_plate_extend(rng.uniform(0, 1, (5, 3)), coords, values)
    with pytest.raises(InputError, match="N = 20 rows"):
        extend.thin_plate_extend(new, coords, values[:19])
    with pytest.raises(CoordinateError, match="shape"):
        extend.thin_plate_extend(new, rng.uniform(0, 1, (20, 4)), values)
    nan_values = values.copy()
    nan_values[7, 2] = np.nan
    with pytest.raises(InputError, match=r"fitted site\(s\) \[7\]"):
        extend.extend_basis(new, coords, nan_values)
    duplicated = coords.copy()
    duplicated[5] = duplicated[2]
    with pytest.raises(DuplicateSiteError):
        extend.thin_plate_extend(new, duplicated, values)
    with pytest.raises(InputError, match="smoothing"):
        extend.local_extend(new, coords, values, smoothing=-1.0)
    with pytest.raises(InputError, match="neighbors"):
        extend.local_extend(new, coords, values, neighbors=2)
    with pytest.raises(InputError, match="method"):
        extend.extend_basis(new, coords, values, method="nearest")


def test_inputs_not_modified_and_vector_shapes():
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 1, (30, 2))
    values = rng.standard_normal(30)
    new = rng.uniform(0, 1, (7, 2))
    copies = [a.copy() for a in (coords, values, new)]
    for method in ("global", "local"):
        out = extend.extend_basis(new, coords, values, method=method, neighbors=10, smoothing=0.2)
        assert out.shape == (7,)
    for original, kept in zip((coords, values, new), copies):
        np.testing.assert_array_equal(original, kept)
    assert extend.local_extend(np.empty((0, 2)), coords, values).shape == (0,)


def test_sites_on_a_line_extend_along_it():
    """A transect in 2-D: the spline lives on the line (a 1-D spline along it), and a new
    site takes the value at its projection onto the line."""
    rng = np.random.default_rng(2)
    along = np.sort(rng.uniform(0.0, 100.0, 15))
    direction = np.array([0.6, 0.8])
    collinear = 5.0 + along[:, None] * direction
    values = np.column_stack([np.sin(along / 20.0), along**2 / 1e3])
    new_along = np.array([3.0, 41.5, 77.0])
    offset = np.array([-0.8, 0.6]) * np.array([[0.0], [12.0], [-7.0]])  # perpendicular shifts
    new = 5.0 + new_along[:, None] * direction + offset
    on_line = extend.thin_plate_extend(new, collinear, values)
    one_d = extend.thin_plate_extend((new_along - along.mean())[:, None], (along - along.mean())[:, None], values)
    np.testing.assert_allclose(on_line, one_d, rtol=1e-9, atol=1e-12)
    local = extend.local_extend(new, collinear, values, neighbors=8)
    np.testing.assert_allclose(local, extend.local_extend(new_along[:, None], along[:, None], values, neighbors=8),
                               rtol=1e-9, atol=1e-12)


def test_cached_thin_plate_factor_gives_the_same_extension():
    """The factorised system is cached by sites, smoothing and spacing: a second call (from
    the cache), a call after clearing it and a call with another smoothing are consistent."""
    from xadapter.engine.geometry_cache import GEOMETRY_CACHE, clear_geometry_cache

    rng = np.random.default_rng(4)
    coords, new = rng.uniform(0.0, 300.0, (60, 2)), rng.uniform(0.0, 300.0, (9, 2))
    values = rng.normal(size=(60, 3))
    clear_geometry_cache()
    first = extend.thin_plate_extend(new, coords, values)
    assert len(GEOMETRY_CACHE.entries) == 1
    np.testing.assert_array_equal(extend.thin_plate_extend(new, coords, values), first)
    np.testing.assert_array_equal(extend.thin_plate_extend(new, coords, values * 2.0), 2.0 * first)
    smoothed = extend.thin_plate_extend(new, coords, values, smoothing=0.5)
    assert len(GEOMETRY_CACHE.entries) == 2 and np.abs(smoothed - first).max() > 1e-3
    clear_geometry_cache()
    np.testing.assert_array_equal(extend.thin_plate_extend(new, coords, values), first)
    # exact interpolation at the fitted sites, from the cached factor as well
    np.testing.assert_allclose(extend.thin_plate_extend(coords, coords, values), values, atol=1e-9)
