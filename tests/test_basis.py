"""Tests of the Phi-step solver ``xadapter.basis``.

References are independent computations: ``numpy.linalg.svd`` of the centred data,
``numpy.linalg.eigh`` of the dense ``Dc^T Dc - tau1 Omega`` built here, and known
patterns of synthetic fields.
"""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from xadapter.engine import basis as basis_module
from xadapter.engine.basis import explained_variance, solve_basis, subspace_distance
from xadapter.exceptions import InputError, ProblemTooLargeError
from xadapter.engine.penalty import build_penalty


# --------------------------------------------------------------------------- data


def low_rank_data(n_times, n_sites, rank=5, noise=0.5, seed=0, offset=3.0):
    """Random orthonormal patterns with well separated variances, plus noise and a mean."""
    rng = np.random.default_rng(seed)
    patterns = np.linalg.qr(rng.standard_normal((n_sites, rank)))[0]
    std = np.sqrt(n_sites) * 0.7 ** np.arange(rank)
    data = (rng.standard_normal((n_times, rank)) * std) @ patterns.T
    data += noise * rng.standard_normal((n_times, n_sites))
    data += offset * rng.standard_normal(n_sites)
    return data


def grid_coords(nx, ny):
    x, y = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float))
    return np.column_stack([x.ravel(), y.ravel()])


def smooth_patterns(coords, centres, widths):
    """Gaussian bumps, orthonormalised (columns)."""
    raw = np.column_stack([
        np.exp(-((coords - np.asarray(centre)) ** 2).sum(axis=1) / (2.0 * width**2))
        for centre, width in zip(centres, widths)
    ])
    return np.linalg.qr(raw)[0]


def ar1_scores(n_times, std, coefficient, rng):
    std = np.asarray(std, dtype=float)
    scores = np.empty((n_times, std.size))
    scores[0] = std * rng.standard_normal(std.size)
    innovation = np.sqrt(1.0 - coefficient**2) * std
    for t in range(1, n_times):
        scores[t] = coefficient * scores[t - 1] + innovation * rng.standard_normal(std.size)
    return scores


@pytest.fixture(scope="module")
def grid_field():
    """N = 400 sites on a 20 x 20 grid, T = 500, three smooth patterns, AR(1) scores.

    Noise (sd 1) is strong: the weakest pattern has signal-to-noise ratio 4 per site
    at N / T = 0.8, so plain EOFs recover it with |cos| of only about 0.9.
    """
    coords = grid_coords(20, 20)
    patterns = smooth_patterns(coords, [(5, 5), (14, 8), (7, 15)], [4.0, 4.5, 4.0])
    rng = np.random.default_rng(0)
    scores = ar1_scores(500, np.sqrt([12.0, 8.0, 4.0]), 0.6, rng)
    data = scores @ patterns.T + rng.standard_normal((500, 400))
    omega = build_penalty(coords, kind="tps")
    return data, patterns, omega


@pytest.fixture(scope="module")
def field_3000():
    """N = 3000 sites (60 x 50 grid), T = 400, smooth signal plus noise, graph penalty."""
    coords = grid_coords(60, 50)
    rng = np.random.default_rng(3)
    centres = rng.uniform([0, 0], [60, 50], size=(12, 2))
    patterns = smooth_patterns(coords, centres, rng.uniform(4.0, 10.0, size=12))
    scores = rng.standard_normal((400, 12)) * np.sqrt(np.linspace(30.0, 3.0, 12))
    data = scores @ patterns.T + rng.standard_normal((400, 3000)) + 2.0
    omega = build_penalty(coords, kind="graph")
    assert sp.issparse(omega)
    return data, omega


def top_right_singular_vectors(data, rank, center=True):
    matrix = data - data.mean(axis=0) if center else data
    return np.linalg.svd(matrix, full_matrices=False)[2][:rank].T


def dense_reference(data, omega, tau1, rank):
    """Top eigenvectors of Dc^T Dc - tau1 Omega by numpy's full eigh."""
    centred = data - data.mean(axis=0)
    omega = omega.toarray() if sp.issparse(omega) else omega
    values, vectors = np.linalg.eigh(centred.T @ centred - tau1 * omega)
    return values[::-1][:rank], vectors[:, ::-1][:, :rank]


def orthonormality_error(basis):
    return np.abs(basis.T @ basis - np.eye(basis.shape[1])).max()


# --------------------------------------------------------------------------- tau2 = 0


@pytest.mark.parametrize(
    "n_times, n_sites, method, solver, dual_gram_max",
    [
        (200, 500, "auto", "dual-gram", None),  # T <= 300: LAPACK on Dc Dc^T
        (400, 600, "matrix-free", "dual-gram", None),  # Lanczos on Dc Dc^T
        (400, 600, "matrix-free", "dual-lanczos", 100),  # operator Dc Dc^T, no Gram
        (300, 500, "dense", "dense", None),
        (600, 200, "auto", "dense", None),
        (600, 200, "matrix-free", "lanczos", None),  # T > N: primal operator
    ],
)
def test_tau_zero_spans_top_singular_vectors(monkeypatch, n_times, n_sites, method, solver, dual_gram_max):
    if dual_gram_max is not None:
        monkeypatch.setattr(basis_module, "DUAL_GRAM_MAX_TIMES", dual_gram_max)
    data = low_rank_data(n_times, n_sites, rank=6, seed=n_times + n_sites)
    basis, info = solve_basis(data, 5, method=method, return_info=True)
    assert info["solver"] == solver
    assert info["converged"]
    reference = top_right_singular_vectors(data, 5)
    assert subspace_distance(basis, reference) < 1e-8
    # Each column is a singular vector (not only the span).
    assert np.abs(np.abs(np.sum(basis * reference, axis=0)) - 1.0).max() < 1e-8
    assert orthonormality_error(basis) < 1e-12
    singular = np.linalg.svd(data - data.mean(axis=0), compute_uv=False)[:5]
    np.testing.assert_allclose(info["eigenvalues"], singular**2, rtol=1e-10)


@pytest.mark.parametrize("method", ["dense", "matrix-free"])
def test_center_false_uses_raw_data(method):
    data = low_rank_data(150, 300, seed=5, offset=10.0)
    basis = solve_basis(data, 4, center=False, method=method)
    assert subspace_distance(basis, top_right_singular_vectors(data, 4, center=False)) < 1e-8
    # The uncentred leading vector follows the large mean, unlike the centred one.
    assert subspace_distance(basis, top_right_singular_vectors(data, 4)) > 0.1


def test_dense_and_matrix_free_agree_at_3000_sites(field_3000):
    data, omega = field_3000
    for kwargs, free_solver in [({}, "dual-gram"), ({"omega": omega, "tau1": 200.0}, "lanczos")]:
        dense, dense_info = solve_basis(data, 8, method="dense", return_info=True, **kwargs)
        free, free_info = solve_basis(data, 8, method="matrix-free", return_info=True, **kwargs)
        assert dense_info["solver"] == "dense"
        assert free_info["solver"] == free_solver
        assert subspace_distance(dense, free) < 1e-6
        # Same signs and order, so the columns themselves agree.
        assert np.abs(dense - free).max() < 1e-6
        np.testing.assert_allclose(dense_info["eigenvalues"], free_info["eigenvalues"], rtol=1e-9)


def test_penalised_basis_is_exact_eigenvectors(grid_field):
    data, _, omega = grid_field
    tau1 = 3e4
    values, vectors = dense_reference(data, omega, tau1, 4)
    for method in ("dense", "matrix-free"):
        basis, info = solve_basis(data, 4, omega=omega, tau1=tau1, method=method, return_info=True)
        assert subspace_distance(basis, vectors) < 1e-8
        np.testing.assert_allclose(np.sort(info["eigenvalues"])[::-1], values, rtol=1e-10)


def test_sparse_and_dense_omega_give_the_same_basis(grid_field):
    data, _, omega = grid_field
    as_sparse = sp.csr_matrix(omega)
    for method in ("dense", "matrix-free"):
        from_dense = solve_basis(data, 3, omega=omega, tau1=1e4, method=method)
        from_sparse = solve_basis(data, 3, omega=as_sparse, tau1=1e4, method=method)
        assert np.abs(from_dense - from_sparse).max() < 1e-9


def test_recovery_on_2d_field_and_roughness(grid_field):
    data, patterns, omega = grid_field
    tau1_grid = [0.0, 1e3, 1e4, 1e5]
    cosines, roughness = [], []
    for tau1 in tau1_grid:
        basis = solve_basis(data, 3, omega=omega, tau1=tau1)
        cosines.append(np.abs(basis.T @ patterns).max(axis=0))
        roughness.append(np.trace(basis.T @ omega @ basis))
    # Plain EOFs (tau1 = 0) miss the weak pattern; smoothing recovers every pattern.
    assert cosines[0].min() < 0.95
    assert cosines[-1].min() >= 0.95
    assert np.all(np.diff(roughness) < 0)
    # Matched one to one: each true pattern has its own basis column.
    best = solve_basis(data, 3, omega=omega, tau1=1e5)
    assert sorted(np.abs(best.T @ patterns).argmax(axis=0)) == [0, 1, 2]


def test_columns_have_deterministic_sign_and_order(grid_field):
    data, _, omega = grid_field
    first = solve_basis(data, 5, omega=omega, tau1=1e4, method="dense")
    # Negating the data leaves Dc^T Dc unchanged; an eigensolver's arbitrary signs
    # must not show through.
    second = solve_basis(-data, 5, omega=omega, tau1=1e4, method="matrix-free")
    assert np.abs(first - second).max() < 1e-9
    rows = np.abs(first).argmax(axis=0)
    assert np.all(first[rows, np.arange(5)] > 0)
    centred = data - data.mean(axis=0)
    variance = np.sum((centred @ first) ** 2, axis=0)
    assert np.all(np.diff(variance) <= 0)
    np.testing.assert_allclose(explained_variance(data, first), variance / data.shape[0], rtol=1e-12)


def test_order_is_by_explained_variance_not_penalised_eigenvalue():
    # Two patterns: a rough one with more variance, a smooth one with less. A strong
    # penalty puts the smooth one first among eigenvalues of A, but the output order
    # is by explained variance.
    n = 50
    s = np.arange(n, dtype=float)
    smooth = np.exp(-((s - 25) ** 2) / 50.0)
    rough = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    patterns = np.linalg.qr(np.column_stack([rough, smooth]))[0]
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((400, 2)) * [3.0, 2.0]) @ patterns.T + 0.01 * rng.standard_normal((400, n))
    second_difference = sp.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(n, n)).toarray()
    omega = second_difference.T @ second_difference
    omega /= np.linalg.eigvalsh(omega)[-1]
    tau1 = 3000.0
    basis, info = solve_basis(data, 2, omega=omega, tau1=tau1, return_info=True)
    assert info["eigenvalues"][0] < info["eigenvalues"][1]
    assert info["explained_variance"][0] > info["explained_variance"][1]
    assert abs(basis[:, 0] @ patterns[:, 0]) > 0.95


def test_warm_start_needs_fewer_iterations(field_3000):
    data, omega = field_3000
    previous = solve_basis(data, 8, omega=omega, tau1=200.0, method="matrix-free")
    cold, cold_info = solve_basis(data, 8, omega=omega, tau1=220.0, method="matrix-free", return_info=True)
    warm, warm_info = solve_basis(data, 8, omega=omega, tau1=220.0, method="matrix-free",
                                  init=previous, return_info=True)
    assert warm_info["iterations"] < cold_info["iterations"]
    assert subspace_distance(warm, cold) < 1e-8


def test_inputs_are_not_modified(grid_field):
    data, _, omega = grid_field
    data_copy, omega_copy = data.copy(), omega.copy()
    init = np.linalg.qr(np.random.default_rng(0).standard_normal((400, 3)))[0]
    init_copy = init.copy()
    solve_basis(data, 3, omega=omega, tau1=1e3, init=init)
    solve_basis(data, 3, omega=omega, tau1=1e3, tau2=100.0, init=init)
    assert np.array_equal(data, data_copy)
    assert np.array_equal(omega, omega_copy)
    assert np.array_equal(init, init_copy)


@pytest.mark.parametrize("method", ["auto", "matrix-free"])
def test_rank_above_data_rank_still_gives_orthonormal_basis(method):
    # Exactly rank-2 data, T < N, rank 4: the dual has only two usable directions.
    rng = np.random.default_rng(6)
    patterns = np.linalg.qr(rng.standard_normal((100, 2)))[0]
    data = (rng.standard_normal((50, 2)) * [5.0, 2.0]) @ patterns.T
    basis = solve_basis(data, 4, method=method)
    assert orthonormality_error(basis) < 1e-10
    assert subspace_distance(basis[:, :2], patterns) < 1e-8


def test_float32_and_list_input():
    data = low_rank_data(120, 80, seed=9)
    reference = solve_basis(data, 3)
    assert subspace_distance(solve_basis(data.tolist(), 3), reference) < 1e-12
    assert subspace_distance(solve_basis(data.astype(np.float32), 3), reference) < 1e-3


# --------------------------------------------------------------------------- tau2 > 0


def test_sparsity_grows_with_tau2_and_columns_stay_orthonormal(grid_field):
    data, patterns, omega = grid_field
    shares = []
    for tau2 in (0.0, 30.0, 100.0, 300.0):
        basis, info = solve_basis(data, 3, omega=omega, tau1=1e4, tau2=tau2, return_info=True)
        assert orthonormality_error(basis) < 1e-6
        shares.append(np.mean(basis == 0.0))
        if tau2 > 0:
            assert info["solver"] == "admm" and info["converged"]
            assert info["orthonormalized_on_support"]
            assert info["zero_fraction"] == shares[-1]
    assert shares[0] == 0.0
    assert np.all(np.diff(shares) > 0)
    assert shares[-1] > 0.3
    # Moderate sparsity keeps the patterns (their tails are near zero anyway).
    moderate = solve_basis(data, 3, omega=omega, tau1=1e4, tau2=30.0)
    assert np.abs(moderate.T @ patterns).max(axis=0).min() > 0.95


def test_sparse_objective_beats_smooth_solution(grid_field):
    # The ADMM result must score at least as well as the tau2 = 0 basis on the
    # tau2 > 0 objective tr(Phi^T A Phi) - tau2 |Phi|_1 (it starts there).
    data, _, omega = grid_field
    tau1, tau2 = 1e4, 100.0
    centred = data - data.mean(axis=0)

    def objective(phi):
        return np.sum((centred @ phi) ** 2) - tau1 * np.trace(phi.T @ omega @ phi) - tau2 * np.abs(phi).sum()

    smooth = solve_basis(data, 3, omega=omega, tau1=tau1)
    sparse = solve_basis(data, 3, omega=omega, tau1=tau1, tau2=tau2)
    assert objective(sparse) > objective(smooth)


def test_admm_linear_solvers_agree(grid_field):
    data, _, omega = grid_field
    # Cholesky (dense) against conjugate gradients (matrix-free, penalised) ...
    dense, dense_info = solve_basis(data, 3, omega=omega, tau1=1e4, tau2=100.0, method="dense", return_info=True)
    free, free_info = solve_basis(data, 3, omega=omega, tau1=1e4, tau2=100.0, method="matrix-free",
                                  return_info=True)
    assert (dense_info["linear_solver"], free_info["linear_solver"]) == ("cholesky", "cg")
    assert np.abs(dense - free).max() < 1e-6
    # ... and against Woodbury through the T x T matrix (no penalty).
    dense0, info0 = solve_basis(data, 3, tau2=100.0, method="dense", return_info=True)
    free0, info1 = solve_basis(data, 3, tau2=100.0, method="matrix-free", return_info=True)
    assert (info0["linear_solver"], info1["linear_solver"]) == ("cholesky", "woodbury")
    assert np.abs(dense0 - free0).max() < 1e-6


def test_admm_warm_start_needs_fewer_iterations(grid_field):
    data, _, omega = grid_field
    previous = solve_basis(data, 3, omega=omega, tau1=1e4, tau2=100.0)
    cold, cold_info = solve_basis(data, 3, omega=omega, tau1=1e4, tau2=110.0, return_info=True)
    warm, warm_info = solve_basis(data, 3, omega=omega, tau1=1e4, tau2=110.0, init=previous, return_info=True)
    assert warm_info["converged"] and cold_info["converged"]
    assert warm_info["iterations"] < cold_info["iterations"]
    assert subspace_distance(warm, cold) < 1e-2


# --------------------------------------------------------------------------- helpers


def test_subspace_distance_against_projectors():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 4))
    b = rng.standard_normal((30, 4))
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
    expected = np.linalg.norm(qa @ qa.T - qb @ qb.T)
    assert subspace_distance(a, b) == pytest.approx(expected, rel=1e-12)
    # Unequal widths.
    c = rng.standard_normal((30, 2))
    qc = np.linalg.qr(c)[0]
    assert subspace_distance(a, c) == pytest.approx(np.linalg.norm(qa @ qa.T - qc @ qc.T), rel=1e-12)
    # Same span, different basis; orthogonal spans.
    assert subspace_distance(a, a @ rng.standard_normal((4, 4))) < 1e-13
    e = np.eye(30)
    assert subspace_distance(e[:, :3], e[:, 3:6]) == pytest.approx(np.sqrt(6.0), rel=1e-14)


def test_subspace_distance_resolves_tiny_angles():
    # 2k - 2||a^T b||^2 would round to zero here; the distance is sqrt(2) * angle.
    angle = 1e-11
    e = np.eye(10)
    a = e[:, :2]
    b = a.copy()
    b[:, 0] = np.cos(angle) * e[:, 0] + np.sin(angle) * e[:, 5]
    assert subspace_distance(a, b) == pytest.approx(np.sqrt(2.0) * angle, rel=1e-6)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rank": 40}, "rank must be smaller than the number of sites"),
        ({"rank": 50}, "rank must be smaller than the number of sites"),
        ({"rank": 0}, "rank must be at least 1"),
        ({"rank": 2.5}, "rank must be an integer"),
        ({"tau1": -1.0}, "tau1 must be finite and >= 0"),
        ({"tau2": -0.1}, "tau2 must be finite and >= 0"),
        ({"tau1": np.nan}, "tau1 must be finite"),
        ({"tau1": 1.0, "omega": None}, "needs a penalty matrix omega"),
        ({"omega": np.eye(39)}, r"omega must be a square \(40, 40\) matrix"),
        ({"omega": sp.eye(41, format="csr")}, r"omega must be a square \(40, 40\) matrix"),
        ({"omega": np.triu(np.ones((40, 40)))}, "omega must be symmetric"),
        ({"init": np.ones((40, 2))}, r"init must have shape \(N, rank\)"),
        ({"method": "fast"}, "unknown method"),
        ({"rho": -1.0}, "rho must be finite and >= 0"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
    ],
)
def test_bad_parameters_raise_input_error(change, match):
    data = low_rank_data(30, 40, seed=1)
    kwargs = {"rank": 3, "omega": np.eye(40), "tau1": 0.0}
    kwargs.update(change)
    rank = kwargs.pop("rank")
    with pytest.raises(InputError, match=match):
        solve_basis(data, rank, **kwargs)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_data_raise_input_error(bad_value):
    data = low_rank_data(30, 40, seed=1)
    data[3, 7] = bad_value
    with pytest.raises(InputError, match="data contain NaN or infinite values"):
        solve_basis(data, 3)


def test_bad_data_shapes_raise_input_error():
    with pytest.raises(InputError, match="2-D"):
        solve_basis(np.ones(10), 1)
    with pytest.raises(InputError, match="at least 2 time steps"):
        solve_basis(np.ones((1, 10)), 1)
    with pytest.raises(InputError, match="real numeric"):
        solve_basis(np.array([["a", "b"], ["c", "d"]]), 1)


def test_rho_below_largest_eigenvalue_is_refused():
    data = low_rank_data(60, 40, seed=2)
    with pytest.raises(InputError, match="rho .* must exceed the largest eigenvalue"):
        solve_basis(data, 2, tau2=1.0, rho=1e-3)


def test_dense_refused_above_limit():
    data = np.random.default_rng(0).standard_normal((3, basis_module.DENSE_MAX_SITES + 1))
    with pytest.raises(ProblemTooLargeError, match="method='matrix-free'"):
        solve_basis(data, 1, method="dense")


# --------------------------------------------------------------------------- large N


@pytest.mark.slow
def test_large_n_graph_penalty_matrix_free_memory():
    n_sites, n_times, rank = 50_000, 200, 10
    rng = np.random.default_rng(11)
    coords = rng.uniform(0.0, 1000.0, size=(n_sites, 2))
    centres = rng.uniform(0.0, 1000.0, size=(rank, 2))
    patterns = np.column_stack([np.exp(-((coords - c) ** 2).sum(axis=1) / (2 * 150.0**2)) for c in centres])
    patterns /= np.linalg.norm(patterns, axis=0)
    data = (rng.standard_normal((n_times, rank)) * np.linspace(20.0, 5.0, rank)) @ patterns.T
    data += rng.standard_normal((n_times, n_sites))
    del patterns

    tracemalloc.start()
    try:
        omega = build_penalty(coords, kind="graph")
        basis, info = solve_basis(data, rank, omega=omega, tau1=50.0, return_info=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**30, f"peak traced allocation {peak / 2**20:.0f} MB"
    assert info["solver"] == "lanczos" and info["converged"]
    assert basis.shape == (n_sites, rank)
    assert orthonormality_error(basis) < 1e-10
    # Exact eigenvectors: the residual A phi - lambda phi is at rounding level.
    centred_scores = data @ basis - data.mean(axis=0) @ basis
    image = data.T @ centred_scores - np.outer(data.mean(axis=0), centred_scores.sum(axis=0))
    image -= 50.0 * (omega @ basis)
    residual = image - basis * info["eigenvalues"]
    assert np.linalg.norm(residual, axis=0).max() < 1e-8 * info["eigenvalues"].max()
