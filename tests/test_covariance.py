import tracemalloc

import numpy as np
import pytest

from xadapter.engine.covariance import (
    LowRankCovariance,
    effective_sample_size,
    low_rank_plus_noise,
    wishart_edge,
)
from xadapter.exceptions import InputError, ProblemTooLargeError


def ar1(rng, n_times, n_series, phi):
    """Stationary unit-variance AR(1) series in the columns."""
    shocks = rng.standard_normal((n_times, n_series))
    series = np.empty_like(shocks)
    series[0] = shocks[0]
    for t in range(1, n_times):
        series[t] = phi * series[t - 1] + np.sqrt(1 - phi**2) * shocks[t]
    return series


def low_rank_field(rng, n_times, n_sites, score_variances, noise_sd=1.0, phi_scores=0.0, phi_noise=0.0):
    patterns = np.linalg.qr(rng.standard_normal((n_sites, len(score_variances))))[0]
    scores = ar1(rng, n_times, len(score_variances), phi_scores) * np.sqrt(score_variances)
    return scores @ patterns.T + noise_sd * ar1(rng, n_times, n_sites, phi_noise)


def top_eigenvectors(data, rank):
    centred = data - data.mean(axis=0)
    return np.linalg.svd(centred, full_matrices=False)[2][:rank].T


def sample_covariance(data, center=True):
    # the 1/T covariance, as SpatPCA forms it
    if center:
        return np.cov(data, rowvar=False, bias=True)
    return data.T @ data / data.shape[0]


def paper_rule_reference(basis, data, gamma, center=True):
    """Paper's rule, written as a direct scan over every L with the dense S."""
    cov = sample_covariance(data, center)
    n_sites, rank = basis.shape
    values, vectors = np.linalg.eigh(basis.T @ cov @ basis)
    values, vectors = values[::-1], vectors[:, ::-1]
    total = np.trace(cov)
    noise = {}
    for L in range(1, rank + 1):
        noise[L] = (total - values[:L].sum() + L * gamma) / (n_sites - L)
    passing = [L for L in noise if values[L - 1] - gamma >= noise[L]]
    sigma2 = noise[max(passing)] if passing and values[0] > gamma else total / n_sites
    eigenvalues = np.maximum(values - sigma2 - gamma, 0.0)
    return eigenvalues, sigma2, basis @ vectors, values, total


# --- noise-calibrated rule (default) --------------------------------------------------------


def test_true_rank_three_is_recovered_with_noise_variance_within_five_percent():
    rng = np.random.default_rng(0)
    data = low_rank_field(rng, 1000, 200, [40.0, 20.0, 10.0], noise_sd=1.5)
    cov = low_rank_plus_noise(top_eigenvectors(data, 10), data)
    assert cov.effective_rank == 3
    assert cov.noise_variance == pytest.approx(1.5**2, rel=0.05)
    assert np.all(cov.eigenvalues[3:] == 0)
    assert np.all(np.diff(cov.eigenvalues) <= 0)
    # eigenvalues estimate the score variances up to the sample variance of the scores
    np.testing.assert_allclose(cov.eigenvalues[:3], [40.0, 20.0, 10.0], rtol=0.25)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0, 2.0, 10.0])
def test_pure_white_noise_gives_rank_zero(ratio):
    rng = np.random.default_rng(int(ratio * 10))
    n_times = 400 if ratio <= 1 else 100
    n_sites = int(ratio * n_times)
    data = 2.0 * rng.standard_normal((n_times, n_sites))
    cov = low_rank_plus_noise(top_eigenvectors(data, 10), data)
    assert cov.effective_rank == 0
    assert np.all(cov.eigenvalues == 0)
    # with nothing kept, sigma^2 = tr(S) / N: the (T - 1) / T centring shrinkage only
    assert cov.noise_variance == pytest.approx(4.0 * (n_times - 1) / n_times, rel=0.03)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0, 2.0, 10.0])
def test_pure_persistent_noise_gives_rank_zero_thanks_to_effective_sample_size(ratio):
    rng = np.random.default_rng(100 + int(ratio * 10))
    n_times = 400 if ratio <= 1 else 100
    n_sites = int(ratio * n_times)
    data = ar1(rng, n_times, n_sites, 0.9)
    basis = top_eigenvectors(data, 10)
    cov = low_rank_plus_noise(basis, data)
    assert cov.effective_rank == 0
    # AR(1) 0.9: n_eff = T (1 - 0.9) / (1 + 0.9), about T / 19
    assert cov.n_eff == pytest.approx(n_times * 0.1 / 1.9, rel=0.3)
    # the same field read as independent time steps keeps spurious components
    assert low_rank_plus_noise(basis, data, effective_sample_size=False).effective_rank > 0


def test_persistent_signal_keeps_its_rank():
    rng = np.random.default_rng(5)
    data = low_rank_field(rng, 600, 150, [30.0, 15.0, 8.0], phi_scores=0.95)
    cov = low_rank_plus_noise(top_eigenvectors(data, 10), data)
    assert cov.effective_rank == 3
    # n_eff measures the noise, not the persistent signal
    assert cov.n_eff > 0.9 * 600
    assert cov.noise_variance == pytest.approx(1.0, rel=0.05)


def test_given_n_eff_is_used_and_raises_the_edge():
    rng = np.random.default_rng(6)
    data = low_rank_field(rng, 300, 100, [6.0, 3.0])
    basis = top_eigenvectors(data, 6)
    free = low_rank_plus_noise(basis, data, n_eff=300)
    strict = low_rank_plus_noise(basis, data, n_eff=15)
    assert free.n_eff == 300 and strict.n_eff == 15
    assert np.all(strict.edge[:3] > free.edge[:3])
    assert free.effective_rank == 2
    assert strict.effective_rank < free.effective_rank
    off = low_rank_plus_noise(basis, data, effective_sample_size=False)
    assert off.n_eff == 300
    np.testing.assert_array_equal(off.edge, free.edge)


def test_edge_follows_the_johnstone_formula():
    n, p = 199.0, 100.0
    a, b = np.sqrt(n - 0.5), np.sqrt(p - 0.5)
    expected = ((a + b) ** 2 + 3 * (a + b) * (1 / a + 1 / b) ** (1 / 3)) / n
    assert wishart_edge(n, p, tw_units=3) == pytest.approx(expected, rel=1e-12)
    # close to the Marchenko-Pastur edge (1 + sqrt(p/n))^2 for large sizes
    assert wishart_edge(1e6, 5e5, tw_units=0) == pytest.approx((1 + np.sqrt(0.5)) ** 2, rel=1e-3)
    rng = np.random.default_rng(7)
    data = rng.standard_normal((200, 100))
    cov = low_rank_plus_noise(top_eigenvectors(data, 4), data, n_eff=200, tw_units=3)
    # test L uses N - L sites and (T - 1 - L) degrees of freedom
    for L in range(1, 5):
        assert cov.edge[L - 1] == pytest.approx(wishart_edge(199 - L, 100 - L, 3), rel=1e-12)


def test_rank_is_never_above_half_the_available_eigenvalues():
    rng = np.random.default_rng(8)
    data = rng.standard_normal((21, 300))
    cov = low_rank_plus_noise(top_eigenvectors(data, 15), data)
    assert np.all(np.isinf(cov.edge[10:]))
    assert cov.effective_rank == 0


# --- effective sample size ------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_effective_sample_size_of_ar1_series(phi):
    rng = np.random.default_rng(int(phi * 10))
    series = ar1(rng, 2000, 40, phi) + 5.0
    expected = 2000 * (1 - phi) / (1 + phi)
    assert effective_sample_size(series) == pytest.approx(expected, rel=0.1)
    # summing the autocorrelations instead gives the same long-run ratio
    assert effective_sample_size(series, max_lag=40) == pytest.approx(expected, rel=0.25)


def test_effective_sample_size_is_clipped_to_one_and_t():
    t = np.arange(50.0)
    assert effective_sample_size(np.cos(np.pi * t)) == 50.0  # anti-persistent
    assert effective_sample_size(t) == 1.0  # a trend: one independent step


# --- paper's / SpatPCA's rule ----------------------------------------------------------------


def random_basis(rng, data, rank, blur=0.3):
    """Orthonormal basis near the leading subspace but not its eigenvectors."""
    top = top_eigenvectors(data, rank)
    return np.linalg.qr(top + blur * rng.standard_normal(top.shape) / np.sqrt(top.shape[0]))[0]


@pytest.mark.parametrize("center", [True, False])
def test_numeric_gamma_matches_a_direct_scan_of_the_paper_rule(center):
    rng = np.random.default_rng(11)
    data = low_rank_field(rng, 120, 60, [9.0, 4.0, 2.0, 1.0]) + 0.3
    basis = random_basis(rng, data, 6)
    d1 = low_rank_plus_noise(basis, data, gamma=0.0, center=center).sample_eigenvalues[0]
    for gamma in [0.0, 0.01, 0.3, 1.0, 3.0, 0.9 * d1, d1, 2 * d1]:
        cov = low_rank_plus_noise(basis, data, gamma=gamma, center=center)
        eigenvalues, sigma2, loadings, values, total = paper_rule_reference(basis, data, gamma, center)
        np.testing.assert_allclose(cov.sample_eigenvalues, values, rtol=1e-10)
        assert cov.total_variance == pytest.approx(total, rel=1e-12)
        assert cov.noise_variance == pytest.approx(sigma2, rel=1e-10)
        np.testing.assert_allclose(cov.eigenvalues, eigenvalues, rtol=1e-10, atol=1e-12)
        assert cov.effective_rank == np.count_nonzero(eigenvalues > 0)
        assert cov.gamma == gamma and cov.edge is None and cov.n_eff is None


def test_numeric_gamma_falls_back_to_mean_variance_when_no_component_passes():
    # d_1 - gamma below sigma_1^2: sigma^2 = tr(S) / N and nothing is kept
    rng = np.random.default_rng(12)
    data = rng.standard_normal((80, 40))
    basis = top_eigenvectors(data, 5)
    d = low_rank_plus_noise(basis, data, gamma=0.0).sample_eigenvalues
    gamma = 0.99 * d[0]
    cov = low_rank_plus_noise(basis, data, gamma=gamma)
    total = np.trace(sample_covariance(data))
    assert d[0] - gamma < (total - d[0] + gamma) / 39
    assert cov.noise_variance == pytest.approx(total / 40, rel=1e-12)
    assert cov.effective_rank == 0


def test_gamma_zero_keeps_every_component_on_pure_noise():
    rng = np.random.default_rng(13)
    data = rng.standard_normal((200, 100))
    basis = top_eigenvectors(data, 8)
    assert low_rank_plus_noise(basis, data, gamma=0.0).effective_rank == 8
    assert low_rank_plus_noise(basis, data).effective_rank == 0


def test_larger_gamma_shrinks_every_eigenvalue():
    rng = np.random.default_rng(14)
    data = low_rank_field(rng, 150, 80, [12.0, 6.0, 3.0, 1.5])
    basis = random_basis(rng, data, 8, blur=0.5)
    gammas = np.concatenate([[0.0], np.geomspace(1e-3, 30.0, 40)])
    fits = [low_rank_plus_noise(basis, data, gamma=g) for g in gammas]
    eigenvalues = np.array([f.eigenvalues for f in fits])
    assert np.all(np.diff(eigenvalues, axis=0) <= 1e-12)
    assert np.all(np.diff([f.effective_rank for f in fits]) <= 0)
    assert fits[0].effective_rank == 8 and fits[-1].effective_rank == 0
    assert eigenvalues[10, 0] < eigenvalues[0, 0]


# --- the covariance itself --------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [None, 0.5])
def test_dense_and_variance_match_an_independent_dense_reference(gamma):
    rng = np.random.default_rng(21)
    data = low_rank_field(rng, 300, 90, [20.0, 8.0, 3.0])
    basis = random_basis(rng, data, 7)
    cov = low_rank_plus_noise(basis, data, gamma=gamma)
    reference_cov = sample_covariance(data)
    values, vectors = np.linalg.eigh(basis.T @ reference_cov @ basis)
    values, vectors = values[::-1], vectors[:, ::-1]
    if gamma is None:
        rank = cov.effective_rank
        assert rank == 3
        sigma2 = (np.trace(reference_cov) - values[:rank].sum()) / (90 - rank)
        eigenvalues = np.where(np.arange(7) < rank, np.maximum(values - sigma2, 0), 0.0)
    else:
        eigenvalues, sigma2, *_ = paper_rule_reference(basis, data, gamma)
    loadings = basis @ vectors
    reference = loadings @ np.diag(eigenvalues) @ loadings.T + sigma2 * np.eye(90)
    dense = cov.dense(basis)
    np.testing.assert_allclose(dense, reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov.variance(basis), np.diag(dense), rtol=1e-12)
    np.testing.assert_allclose(cov.loadings(basis).T @ cov.loadings(basis), np.eye(7), atol=1e-10)
    np.testing.assert_allclose(cov.rotation @ cov.rotation.T, np.eye(7), atol=1e-12)


def test_result_is_immutable_and_input_untouched():
    rng = np.random.default_rng(22)
    data = rng.standard_normal((50, 30))
    basis = top_eigenvectors(data, 3)
    data_copy, basis_copy = data.copy(), basis.copy()
    cov = low_rank_plus_noise(basis, data)
    np.testing.assert_array_equal(data, data_copy)
    np.testing.assert_array_equal(basis, basis_copy)
    assert isinstance(cov, LowRankCovariance)
    with pytest.raises(ValueError):
        cov.eigenvalues[0] = 1.0
    with pytest.raises(AttributeError):
        cov.noise_variance = 0.0
    assert (cov.n_sites, cov.n_times, cov.rank) == (30, 50, 3)


def test_float32_data_gives_the_float64_answer():
    rng = np.random.default_rng(23)
    data = low_rank_field(rng, 200, 50, [10.0]).astype(np.float32)
    basis = top_eigenvectors(data.astype(np.float64), 4)
    a = low_rank_plus_noise(basis, data)
    b = low_rank_plus_noise(basis, data.astype(np.float64))
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-12)


# --- bad inputs -------------------------------------------------------------------------------


@pytest.fixture
def small_problem():
    rng = np.random.default_rng(30)
    data = rng.standard_normal((40, 20))
    return top_eigenvectors(data, 4), data


def test_nan_in_data_is_named(small_problem):
    basis, data = small_problem
    data = data.copy()
    data[3, 5] = np.nan
    with pytest.raises(InputError, match="1 NaN"):
        low_rank_plus_noise(basis, data)


def test_non_orthonormal_basis_is_named(small_problem):
    basis, data = small_problem
    with pytest.raises(InputError, match="not orthonormal"):
        low_rank_plus_noise(2.0 * basis, data)


def test_shape_mismatch_is_named(small_problem):
    basis, data = small_problem
    with pytest.raises(InputError, match="data has 19 sites"):
        low_rank_plus_noise(basis, data[:, :19])
    with pytest.raises(InputError, match=r"\(time, sites\)"):
        low_rank_plus_noise(basis, data.ravel())
    with pytest.raises(InputError, match="basis has shape"):
        low_rank_plus_noise(basis, data).loadings(basis[:-1])


def test_rank_not_below_number_of_sites_is_refused(small_problem):
    _, data = small_problem
    with pytest.raises(InputError, match="rank must be at least 1 and below"):
        low_rank_plus_noise(np.eye(20), data)


@pytest.mark.parametrize("gamma", [-0.1, np.nan, "large"])
def test_bad_gamma_is_named(small_problem, gamma):
    basis, data = small_problem
    with pytest.raises(InputError, match="gamma .None or a number. must be"):
        low_rank_plus_noise(basis, data, gamma=gamma)


@pytest.mark.parametrize("n_eff", [0.5, 41, np.inf])
def test_bad_n_eff_is_named(small_problem, n_eff):
    basis, data = small_problem
    with pytest.raises(InputError, match="n_eff must be between 1 and"):
        low_rank_plus_noise(basis, data, n_eff=n_eff)


def test_too_few_time_steps_and_bad_max_lag_are_named(small_problem):
    basis, data = small_problem
    with pytest.raises(InputError, match="at least 3"):
        low_rank_plus_noise(basis, data[:2])
    with pytest.raises(InputError, match="max_lag must be an integer"):
        effective_sample_size(data, max_lag=0)


# --- size ---------------------------------------------------------------------------------------


def test_no_n_by_n_array_at_twenty_thousand_sites():
    n_sites, n_times, rank = 20_000, 40, 10
    rng = np.random.default_rng(40)
    basis = np.linalg.qr(rng.standard_normal((n_sites, rank)))[0]
    data = rng.standard_normal((n_times, n_sites)) + rng.standard_normal((n_times, rank)) @ (100 * basis.T)
    tracemalloc.start()
    try:
        cov = low_rank_plus_noise(basis, data)
        variance = cov.variance(basis)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data_bytes = data.nbytes
    print(f"peak {peak / 1e6:.1f} MB for data of {data_bytes / 1e6:.1f} MB")
    assert peak < 4 * data_bytes  # a centred copy and a few temporaries
    assert peak < n_sites**2 * 8 / 100
    assert variance.shape == (n_sites,)
    assert cov.effective_rank == rank
    with pytest.raises(ProblemTooLargeError, match="dense covariance of 20000 sites"):
        cov.dense(basis)
