import numpy as np
import pytest

from xadapter.engine.admm import HISTORY_KEYS, AdapterFit, fit_adapter
from xadapter.engine.basis import solve_basis, subspace_distance
from xadapter.exceptions import InputError


def second_difference_penalty(n):
    """1-D second-difference penalty D^T D, scaled to unit largest eigenvalue."""
    d = np.diff(np.eye(n), n=2, axis=0)
    omega = d.T @ d
    return omega / np.linalg.eigvalsh(omega)[-1]


def principal_cosines(basis, truth):
    return np.linalg.svd(np.linalg.qr(basis)[0].T @ np.linalg.qr(truth)[0], compute_uv=False)


def smooth_field(n_times=300, n_sites=80, noise_sd=0.5, seed=3):
    """1-D field with three smooth orthonormal patterns, per-site levels and noise."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 1.0, n_sites)
    truth = np.linalg.qr(np.stack([np.sin(np.pi * s), np.sin(2 * np.pi * s), np.cos(3 * np.pi * s)], 1))[0]
    scores = rng.standard_normal((n_times, 3)) * np.array([4.0, 3.0, 2.0]) * np.sqrt(n_sites / 10)
    levels = rng.normal(0.0, 2.0, n_sites)
    data = levels + scores @ truth.T + noise_sd * rng.standard_normal((n_times, n_sites))
    return data, truth


# --------------------------------------------------------------------------- exact path


def test_no_trend_complete_data_is_one_exact_phi_step():
    data, truth = smooth_field(n_times=120, n_sites=40, seed=0)
    original = data.copy()
    fit = fit_adapter(data, 3)
    assert isinstance(fit, AdapterFit)
    assert fit.skipped_loop and fit.converged and fit.n_iter == 0
    assert all(len(fit.history[key]) == 1 for key in HISTORY_KEYS)
    assert subspace_distance(fit.basis, solve_basis(data, 3)) < 1e-8
    # independent: top right singular vectors of the time-centred data (EOF analysis)
    centred = data - data.mean(axis=0)
    svd_basis = np.linalg.svd(centred, full_matrices=False)[2][:3].T
    assert subspace_distance(fit.basis, svd_basis) < 1e-8
    np.testing.assert_allclose(fit.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fit.scores, centred @ fit.basis, atol=1e-10)
    np.testing.assert_array_equal(fit.filled, data)
    assert fit.trend_coef is None
    expected_objective = np.sum(centred**2) - np.sum((centred @ fit.basis) ** 2)
    assert fit.history["objective"][0] == pytest.approx(expected_objective, rel=1e-10)
    np.testing.assert_array_equal(data, original)


def test_no_trend_complete_data_smooth_penalty_matches_dense_eigenproblem():
    data, _ = smooth_field(n_times=60, n_sites=50, noise_sd=2.0, seed=1)
    omega = second_difference_penalty(50)
    tau1 = 500.0
    fit = fit_adapter(data, 2, omega=omega, tau1=tau1)
    centred = data - data.mean(axis=0)
    vectors = np.linalg.eigh(centred.T @ centred - tau1 * omega)[1][:, -2:]
    assert fit.skipped_loop
    assert subspace_distance(fit.basis, vectors) < 1e-8


# --------------------------------------------------------------------------- the paper's benchmark


@pytest.fixture(scope="module")
def paper_benchmark():
    """1-D benchmark: N = 100 sites on [-5, 5], T = 1000, AR(1) scores, 5 covariates."""
    rng = np.random.default_rng(2024)
    n_sites, n_times, n_train = 100, 1000, 800
    s = np.linspace(-5.0, 5.0, n_sites)
    phi = np.exp(-(s**2))
    phi /= np.linalg.norm(phi)
    scores = np.empty(n_times)
    scores[0] = rng.normal(0.0, np.sqrt(10.0))
    innovation_sd = np.sqrt(10.0 * (1.0 - 0.8**2))  # stationary variance 10
    for t in range(1, n_times):
        scores[t] = 0.8 * scores[t - 1] + rng.normal(0.0, innovation_sd)
    covariates = rng.standard_normal((n_times, n_sites, 5))
    beta = np.array([10.0, -9.5, 2.6, -1.3, 1.2])
    y = covariates @ beta + np.outer(scores, phi) + rng.standard_normal((n_times, n_sites))
    train = slice(0, n_train)
    # frozen, misspecified first stage: OLS on the first three covariates, training times
    coef3 = np.linalg.lstsq(covariates[train, :, :3].reshape(-1, 3), y[train].ravel(), rcond=None)[0]
    first_stage = covariates[..., :3] @ coef3
    return {"y": y, "first_stage": first_stage, "covariates": covariates, "phi": phi,
            "beta": beta, "train": train, "test": slice(n_train, n_times)}


@pytest.mark.parametrize("rank", [1, 3])
def test_paper_benchmark(paper_benchmark, rank):
    b = paper_benchmark
    train, test = b["train"], b["test"]
    residual = b["y"] - b["first_stage"]
    fit = fit_adapter(residual[train], rank, covariates=b["covariates"][train])
    assert fit.converged and not fit.skipped_loop

    cosine = abs(fit.basis[:, 0] @ b["phi"])
    assert cosine >= 0.98
    # the trend recovers what the first stage missed: ~0 on the first three, beta on the rest
    np.testing.assert_allclose(fit.trend_coef, [0, 0, 0, -1.3, 1.2], atol=0.03)

    dual = fit.history["dual_residual"]
    assert dual[-1] < dual[0] / 1000
    assert np.all(np.diff(fit.history["iteration"]) == 1)

    # held-out times: scores of each time from half of the sites (least squares on the
    # basis rows there), evaluated at the other half, so the reconstruction never sees
    # the values it is scored on.
    trend = b["covariates"][test] @ fit.trend_coef
    centred = residual[test] - trend - fit.mean
    seen = np.arange(residual.shape[1]) % 2 == 0
    held = ~seen
    scores = np.linalg.lstsq(fit.basis[seen], centred[:, seen].T, rcond=None)[0].T
    prediction = b["first_stage"][test] + trend + fit.mean + scores @ fit.basis.T
    rmse_first = np.sqrt(np.mean((b["y"][test][:, held] - b["first_stage"][test][:, held]) ** 2))
    rmse_adapter = np.sqrt(np.mean((b["y"][test][:, held] - prediction[:, held]) ** 2))
    print(f"\nrank {rank}: |cos| {cosine:.4f}, iterations {fit.n_iter}, dual {dual[0]:.3g} -> {dual[-1]:.3g}, "
          f"held-out RMSE first stage {rmse_first:.3f}, adapter {rmse_adapter:.3f} "
          f"({1 - rmse_adapter / rmse_first:.1%} lower)")
    assert rmse_adapter <= 0.7 * rmse_first


def test_trend_is_optimal_for_the_final_basis():
    """At convergence theta minimises ||J (R - X theta)(I - P)||^2 for the returned basis."""
    rng = np.random.default_rng(7)
    data, _ = smooth_field(n_times=150, n_sites=30, seed=7)
    covariates = rng.standard_normal((150, 30, 3))
    data = data + covariates @ np.array([2.0, -1.0, 0.5])
    fit = fit_adapter(data, 3, covariates=covariates, ridge=0.0, tol_rel=1e-7, max_iter=500)
    assert fit.converged
    projector_out = np.eye(30) - fit.basis @ fit.basis.T
    centring = np.eye(150) - 1.0 / 150

    def transform(field):
        return (centring @ field @ projector_out).ravel()

    design = np.stack([transform(covariates[..., j]) for j in range(3)], axis=1)
    theta = np.linalg.lstsq(design, transform(data), rcond=None)[0]
    np.testing.assert_allclose(fit.trend_coef, theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.filled, data - covariates @ fit.trend_coef, atol=1e-12)
    assert subspace_distance(fit.basis, solve_basis(fit.filled, 3)) < 1e-8


def test_mini_batches_reach_the_full_batch_solution(gappy_field):
    gappy, _, _ = gappy_field
    rng = np.random.default_rng(9)
    covariates = rng.standard_normal(gappy.shape + (2,))
    target = gappy + covariates @ np.array([0.5, -1.0])
    full = fit_adapter(target, 3, covariates=covariates, tol_rel=1e-6, max_iter=400)
    windows = fit_adapter(target, 3, covariates=covariates, batch_size=60, tol_rel=1e-6, max_iter=400)
    assert full.converged and windows.converged
    assert subspace_distance(windows.basis, full.basis) < 1e-5
    np.testing.assert_allclose(windows.trend_coef, full.trend_coef, atol=1e-6)
    np.testing.assert_allclose(windows.filled, full.filled, atol=1e-4 * np.std(full.filled))


# --------------------------------------------------------------------------- missing data


@pytest.fixture(scope="module")
def gappy_field():
    data, truth = smooth_field()
    rng = np.random.default_rng(11)
    gappy = data.copy()
    gappy[rng.uniform(size=data.shape) < 0.3] = np.nan
    gappy[:150, 17] = np.nan  # one site missing for half of the time steps
    gappy[5] = np.nan  # a time with no observation at all
    return gappy, data, truth


@pytest.mark.parametrize("with_trend", [False, True])
def test_missing_data_recovery(gappy_field, with_trend):
    gappy, complete, truth = gappy_field
    original = gappy.copy()
    covariates = None
    if with_trend:
        covariates = np.random.default_rng(5).standard_normal((gappy.shape[0], 2))
        gappy = gappy + (covariates @ np.array([1.0, -2.0]))[:, None]
    fit = fit_adapter(gappy, 3, covariates=covariates)
    cosines = principal_cosines(fit.basis, truth)
    print(f"\nmissing data (trend={with_trend}): principal cosines {np.round(cosines, 4)}, "
          f"iterations {fit.n_iter}")
    assert fit.converged and not fit.skipped_loop
    assert cosines.min() >= 0.95
    for name in ("basis", "scores", "mean", "filled"):
        assert np.isfinite(getattr(fit, name)).all(), name
    for key in HISTORY_KEYS:
        assert np.isfinite(fit.history[key]).all(), key
    observed = ~np.isnan(gappy)
    trend = 0.0 if covariates is None else (covariates @ fit.trend_coef)[:, None]
    np.testing.assert_allclose(fit.filled[observed], (gappy - trend)[observed], atol=1e-12)
    # EM fixed point: missing entries equal the low-rank reconstruction there
    reconstruction = fit.mean + fit.scores @ fit.basis.T
    gap = np.abs(fit.filled - reconstruction)[~observed]
    assert gap.max() < 1e-2 * np.std(fit.filled)
    if with_trend:
        np.testing.assert_allclose(fit.trend_coef, [1.0, -2.0], atol=0.05)
    else:
        np.testing.assert_array_equal(gappy, original)
        # the fills are close to the values that were hidden (noise sd 0.5)
        assert np.sqrt(np.mean((fit.filled - complete)[~observed] ** 2)) < 1.0


def test_site_without_observation_is_named():
    data, _ = smooth_field(n_times=40, n_sites=20)
    data[:, 7] = np.nan
    with pytest.raises(InputError, match=r"column index 7\b"):
        fit_adapter(data, 2)


# --------------------------------------------------------------------------- behaviour


def test_same_seed_same_result(gappy_field):
    gappy, _, _ = gappy_field
    covariates = np.random.default_rng(1).standard_normal((gappy.shape[1], 2))
    kwargs = dict(covariates=covariates, batch_size=100, max_iter=80)
    first = fit_adapter(gappy, 3, seed=3, **kwargs)
    second = fit_adapter(gappy, 3, seed=3, **kwargs)
    assert first.converged
    for name in ("basis", "scores", "mean", "filled", "trend_coef"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    for key in HISTORY_KEYS:
        np.testing.assert_array_equal(first.history[key], second.history[key])
    other = fit_adapter(gappy, 3, seed=4, **kwargs)
    assert not np.array_equal(other.history["primal_residual"], first.history["primal_residual"])


def test_phi_every_and_freeze():
    rng = np.random.default_rng(0)
    data, _ = smooth_field(n_times=100, n_sites=30, seed=2)
    covariates = rng.standard_normal((100, 30, 2))
    fit = fit_adapter(data + covariates @ np.array([1.0, 1.0]), 2, covariates=covariates, phi_every=2, min_iter=6)
    change = fit.history["basis_change"]
    assert np.all(change[0::2] == 0.0)  # iterations 1, 3, 5, ...
    frozen = fit_adapter(data + covariates @ np.array([1.0, 1.0]), 2, covariates=covariates, phi_freeze=3,
                         max_iter=20)
    assert np.all(frozen.history["basis_change"][3:] == 0.0)
    np.testing.assert_allclose(frozen.scores, (frozen.filled - frozen.mean) @ frozen.basis, atol=1e-10)


def test_progress_is_silent_by_default_and_reports_on_request(capsys):
    data, _ = smooth_field(n_times=50, n_sites=20)
    data[0, 0] = np.nan
    fit_adapter(data, 2)
    assert capsys.readouterr().err == ""
    records = []
    fit = fit_adapter(data, 2, progress=records.append)
    assert [r["iteration"] for r in records] == list(fit.history["iteration"])
    with pytest.warns(RuntimeWarning, match="did not meet its stopping rule"):
        fit = fit_adapter(data, 2, progress=1, max_iter=3, min_iter=3, tol_abs=0, tol_rel=0)
    assert not fit.converged and fit.n_iter == 3
    assert capsys.readouterr().err.count("xadapter fit iteration") == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 20}, "rank must be an integer with 1 <= rank < number of sites"),
        ({"rank": 0}, "rank must be"),
        ({"rho": 0.0}, "rho must be finite and > 0"),
        ({"momentum": 1.0}, "momentum must be finite and >= 0 and < 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"phi_every": 1.5}, "phi_every must be an integer"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"tau1": 1.0}, "needs a penalty matrix omega"),
        ({"covariates": np.zeros((7, 2))}, "covariates must have shape"),
    ],
)
def test_bad_settings(kwargs, match):
    data, _ = smooth_field(n_times=40, n_sites=20)
    data[0, 0] = np.nan  # run the loop, where every setting is used
    kwargs = {"rank": 2, **kwargs}
    with pytest.raises(InputError, match=match):
        fit_adapter(data, **kwargs)


def test_bad_data():
    with pytest.raises(InputError, match="2-D"):
        fit_adapter(np.zeros(10), 1)
    with pytest.raises(InputError, match="at least 3 time steps"):
        fit_adapter(np.zeros((2, 5)), 1)
    data = np.ones((10, 5))
    data[1, 1] = np.inf
    with pytest.raises(InputError, match="infinite"):
        fit_adapter(data, 1)


# --------------------------------------------------------------------------- gap fill


def _orthonormal(n_sites, rank, seed):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((n_sites, rank)))[0]


@pytest.mark.parametrize("n_observed", [39, 36, 30, 9, 3])  # 1 and 4 gaps (fewer than the rank), 10 gaps,
# observations about as many as and fewer than the rank
def test_conditional_fill_minimises_the_objective_in_the_gaps(n_observed):
    from xadapter.engine.admm import conditional_fill

    n_sites, rank = 40, 8
    rng = np.random.default_rng(n_observed)
    basis = _orthonormal(n_sites, rank, 1)
    level = rng.normal(size=n_sites)
    values = rng.normal(size=(3, n_sites)) * 5.0
    missing = np.ones((3, n_sites), dtype=bool)
    for row in range(3):
        missing[row, rng.choice(n_sites, n_observed, replace=False)] = False
    missing[2] = False  # a row without gaps is left alone
    before = values.copy()
    conditional_fill(values, missing, level, basis)
    assert np.array_equal(values[~missing], before[~missing])
    projector = np.eye(n_sites) - basis @ basis.T
    for row in range(2):
        u = missing[row]
        residual = projector @ (values[row] - level)
        # stationarity in the missing values, and the least-squares minimiser over them
        assert np.abs(residual[u]).max() < 1e-9
        fixed = projector @ np.where(u, 0.0, before[row] - level)
        best = np.linalg.lstsq(projector[:, u], -fixed, rcond=None)[0]
        assert np.sum(residual**2) <= np.sum((fixed + projector[:, u] @ best) ** 2) + 1e-9
    assert np.all(np.isfinite(values))


def test_fill_scores_equal_the_minimum_norm_least_squares_scores():
    """Rows solved directly (few gaps) and by eigendecomposition (a basis column whose
    sites are all missing) both give the minimum-norm least-squares scores."""
    from xadapter.engine.admm import _least_squares_scores
    from xadapter.engine.kriging import masked_grams

    n_sites, rank = 30, 6
    rng = np.random.default_rng(4)
    basis = _orthonormal(n_sites, rank, 3)
    basis[:, 0] = 0.0
    basis[:3, 0] = 1.0 / np.sqrt(3.0)  # a column living on three sites
    basis, _ = np.linalg.qr(basis)
    missing = rng.random((40, n_sites)) < 0.08
    missing[:5, :3] = True  # the column unobserved: singular Gram
    missing[5:10] = rng.random((5, n_sites)) < 0.6  # many gaps
    centred = np.where(missing, 0.0, rng.normal(size=(40, n_sites)))
    missed = masked_grams(missing, basis)
    scores = _least_squares_scores(np.eye(rank) - missed, centred @ basis)
    for row in range(40):
        observed = basis[~missing[row]]
        expected = np.linalg.lstsq(observed, centred[row, ~missing[row]], rcond=1e-8)[0]
        np.testing.assert_allclose(scores[row], expected, atol=1e-9)


def test_over_relaxed_fill_moves_past_the_minimiser_by_the_factor():
    from xadapter.engine.admm import conditional_fill

    basis = _orthonormal(30, 5, 2)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 30))
    missing = rng.random((4, 30)) < 0.3
    exact, relaxed = values.copy(), values.copy()
    conditional_fill(exact, missing, 0.0, basis, relaxation=1.0)
    conditional_fill(relaxed, missing, 0.0, basis, relaxation=1.5)
    np.testing.assert_allclose(relaxed[missing] - values[missing], 1.5 * (exact[missing] - values[missing]),
                               rtol=1e-12, atol=1e-12)


def test_defaults_converge_on_a_gappy_station_network_with_covariates():
    """300 stations, a year of days, 20 % gaps and two covariates: the default settings
    meet the stopping rule (477 iterations with the EM fill; about 300 now)."""
    from xadapter.datasets import synthetic_field

    field = synthetic_field(365, n_stations=300, missing=0.2, seed=0)["residual"].values
    rng = np.random.default_rng(0)
    elevation = np.broadcast_to(rng.normal(size=300), field.shape)
    temperature = rng.normal(size=field.shape)
    data = field + 0.5 * elevation + 0.3 * temperature
    covariates = np.stack([elevation, temperature], axis=-1)
    fit = fit_adapter(data, 10, covariates=covariates, progress=False)
    assert fit.converged
    # the trend is recovered; the elevation's effect is a per-site level (no time
    # variation to tell it from the site mean), so only the temperature's is identified
    assert abs(fit.trend_coef[1] - 0.3) < 0.02
    observed = ~np.isnan(data)
    np.testing.assert_allclose(fit.filled[observed], (data - covariates @ fit.trend_coef)[observed], atol=1e-9)
