import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from xadapter.engine import penalty
from xadapter.exceptions import InputError, ProblemTooLargeError


def grid(*axes):
    mesh = np.meshgrid(*axes, indexing="xy")
    return np.column_stack([m.ravel() for m in mesh])


def test_thin_plate_matches_spatpca_reference_values():
    # SpatPCA's test suite asserts these Frobenius norms
    two_d = grid([-5.0, 5.0], [-5.0, 5.0])
    assert np.linalg.norm(penalty.thin_plate(two_d)) == pytest.approx(0.362588, abs=1e-6)
    three_d = np.array([(x, y, z) for z in (-5, 5) for y in (-5, 5) for x in (-5, 5)], float)
    assert np.linalg.norm(penalty.thin_plate(three_d)) == pytest.approx(8.191034, abs=1e-6)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_thin_plate_is_psd_and_annihilates_linear_functions(dim):
    rng = np.random.default_rng(dim)
    coords = rng.uniform(-1, 1, (40, dim))
    omega = penalty.thin_plate(coords)
    np.testing.assert_allclose(omega, omega.T, atol=1e-12)
    eig = np.linalg.eigvalsh(omega)
    assert eig.min() > -1e-8 * eig.max()
    # a linear function has zero bending energy; a curved one does not
    linear = 1.0 + coords @ np.arange(1, dim + 1)
    curved = np.sum(coords**2, axis=1)
    assert abs(linear @ omega @ linear) < 1e-6 * (curved @ omega @ curved)
    assert curved @ omega @ curved > 0


def test_thin_plate_is_exact_on_continental_km_coordinates():
    # a 24 x 24 grid 6500 km wide: kernel entries ~1e7 against coordinates ~1e3 made the
    # bordered system's inverse ill-conditioned (reciprocal condition ~1e-18)
    axis = np.linspace(-3200.0, 3200.0, 24)
    coords = grid(axis, axis * 1.04 + 50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        omega = penalty.thin_plate(coords)
    linear = 3.0 + coords @ np.array([0.02, -0.01])
    smooth = np.sin(coords[:, 0] / 2000.0)
    assert abs(linear @ omega @ linear) < 1e-12 * (smooth @ omega @ smooth) * (linear @ linear) / (smooth @ smooth)
    # bending energy in 2-D is invariant to the unit of the coordinates: Omega scales as c^(d-4)
    np.testing.assert_allclose(penalty.thin_plate(coords / 1000.0), omega * 1e6, rtol=1e-7, atol=1e-9 * np.abs(omega * 1e6).max())
    # and equals the limit of SpatPCA's ridge formula, computed on unit-scale coordinates
    unit = coords / 1000.0
    system = penalty.thin_plate_system(unit)
    inverse = np.linalg.inv(system)[: len(unit), : len(unit)]
    np.testing.assert_allclose(penalty.thin_plate(unit), inverse, atol=1e-8 * np.abs(inverse).max())


def test_thin_plate_of_collinear_sites_penalises_curvature_along_the_line():
    t = np.linspace(0.0, 500.0, 30)
    coords = np.column_stack([100.0 + 0.6 * t, -20.0 + 0.8 * t])
    omega = penalty.thin_plate(coords)
    eig = np.linalg.eigvalsh(omega)
    assert eig.min() > -1e-10 * eig.max()
    # two polynomials of degree 1 are distinguishable on a line: a two-dimensional null space
    assert np.sum(eig < 1e-10 * eig.max()) == 2
    assert abs((2.0 + 0.01 * t) @ omega @ (2.0 + 0.01 * t)) < 1e-10 * ((t / 500) ** 2 @ omega @ (t / 500) ** 2)


def test_thin_plate_1d_energy_matches_integral_of_second_derivative():
    # the natural cubic spline through a smooth f with many knots has bending
    # energy close to int (f'')^2: 4 for x^2 and 12 for x^3 on [0, 1]
    x = np.linspace(0, 1, 60)
    omega = penalty.thin_plate(x)
    assert (x**2) @ omega @ (x**2) == pytest.approx(4.0, rel=0.02)
    assert (x**3) @ omega @ (x**3) == pytest.approx(12.0, rel=0.02)


def test_thin_plate_refuses_large_problems():
    with pytest.raises(ProblemTooLargeError, match="graph"):
        penalty.thin_plate(np.zeros((11, 2)), max_sites=10)


def test_graph_laplacian_properties():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10, (300, 2))
    lap = penalty.graph_laplacian(coords, k=6)
    assert sp.issparse(lap)
    dense = lap.toarray()
    np.testing.assert_allclose(dense, dense.T, atol=1e-14)
    np.testing.assert_allclose(dense.sum(axis=1), 0.0, atol=1e-12)
    assert np.linalg.eigvalsh(dense).min() > -1e-10
    lap2 = penalty.graph_laplacian(coords, k=6, order=2)
    np.testing.assert_allclose(lap2.toarray(), dense @ dense, atol=1e-12)
    # a smooth field is cheaper than a rough one
    smooth = np.sin(coords[:, 0] / 3)
    rough = rng.standard_normal(300)
    smooth, rough = smooth / np.linalg.norm(smooth), rough / np.linalg.norm(rough)
    assert smooth @ lap @ smooth < 0.2 * (rough @ lap @ rough)
    with pytest.raises(InputError, match="order"):
        penalty.graph_laplacian(coords, order=3)


def test_graph_laplacian_geographic_invariant_to_longitude_convention():
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-10, 10, 200), rng.uniform(170, 190, 200)
    lon_a = np.where(lon > 180, lon - 360, lon)
    a = penalty.graph_laplacian(np.column_stack([lat, lon_a]), geographic=True)
    b = penalty.graph_laplacian(np.column_stack([lat, lon % 360]), geographic=True)
    np.testing.assert_allclose(a.toarray(), b.toarray(), atol=1e-12)


def test_normalisation_and_scale_invariance():
    rng = np.random.default_rng(2)
    # the normalised penalty does not depend on the unit of the coordinates
    coords = rng.uniform(0, 10, (150, 2))
    for kind in ("graph", "tps"):
        small = penalty.build_penalty(coords, kind)
        large = penalty.build_penalty(coords * 100.0, kind)
        dense_small = small.toarray() if sp.issparse(small) else small
        dense_large = large.toarray() if sp.issparse(large) else large
        assert np.linalg.eigvalsh(dense_small)[-1] == pytest.approx(1.0, rel=1e-5)
        assert np.abs(dense_small - dense_large).max() < 1e-3 * np.abs(dense_large).max()
    with pytest.raises(InputError, match="unknown penalty"):
        penalty.build_penalty(coords, "spline")


def test_graph_penalty_large_n_is_sparse():
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 100, (20000, 2))
    omega = penalty.build_penalty(coords, "graph", k=8, order=2)
    assert sp.issparse(omega)
    assert omega.nnz < 20000 * 200
