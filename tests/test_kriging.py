import tracemalloc

import numpy as np
import pytest
from scipy.sparse.linalg import LinearOperator, cg
from scipy.stats import norm

from xadapter.engine import kriging
from xadapter.exceptions import InputError
from xadapter.engine.kriging import KrigingResult, conformal_multiplier, krige


def dense_krige(data_row, loadings, eigenvalues, noise_variance, target_loadings, mean, target_mean):
    """Textbook simple kriging with the dense covariance (latent signal at targets)."""
    observed = ~np.isnan(data_row)
    lam = np.diag(eigenvalues)
    sigma_oo = loadings[observed] @ lam @ loadings[observed].T + noise_variance * np.eye(observed.sum())
    sigma_po = target_loadings @ lam @ loadings[observed].T
    sigma_pp = target_loadings @ lam @ target_loadings.T
    weights = np.linalg.solve(sigma_oo, sigma_po.T).T
    predicted = target_mean + weights @ (data_row[observed] - mean[observed])
    variance = np.diag(sigma_pp - weights @ sigma_po.T)
    return predicted, variance


@pytest.fixture
def problem():
    rng = np.random.default_rng(42)
    n_sites, rank, n_times = 300, 5, 14
    loadings = rng.standard_normal((n_sites, rank)) / np.sqrt(n_sites) * 2.0
    # a zero eigenvalue beyond the effective rank must be ignored
    eigenvalues = np.array([9.0, 4.0, 2.0, 0.5, 0.0])
    noise_variance = 0.7
    site_mean = rng.normal(3.0, 1.0, n_sites)
    data = site_mean + rng.standard_normal((n_times, n_sites)) * 2.0
    patterns = [rng.random(n_sites) < p for p in (0.0, 0.2, 0.5, 0.9)]
    for t in range(n_times - 2):
        data[t, patterns[t % 4]] = np.nan  # patterns repeat across times
    data[-2, :] = np.nan  # nothing observed
    data[-1, rng.random(n_sites) < 0.97] = np.nan  # a handful observed
    return data, loadings, eigenvalues, noise_variance, site_mean


@pytest.mark.parametrize("include_noise", [True, False])
def test_matches_dense_formulas_at_fitted_sites(problem, include_noise):
    data, loadings, eigenvalues, noise_variance, site_mean = problem
    result = krige(data, loadings, eigenvalues, noise_variance, mean=site_mean, include_noise=include_noise)
    assert result.mean.shape == result.variance.shape == data.shape
    for t in range(data.shape[0]):
        expected_mean, expected_var = dense_krige(
            data[t], loadings, eigenvalues, noise_variance, loadings, site_mean, site_mean
        )
        if include_noise:
            expected_var = expected_var + noise_variance
        np.testing.assert_allclose(result.mean[t], expected_mean, rtol=0, atol=1e-8)
        np.testing.assert_allclose(result.variance[t], expected_var, rtol=0, atol=1e-8)


def test_matches_dense_formulas_at_new_targets(problem):
    data, loadings, eigenvalues, noise_variance, site_mean = problem
    rng = np.random.default_rng(7)
    target_loadings = rng.standard_normal((60, loadings.shape[1])) / np.sqrt(300) * 2.0
    target_mean = rng.normal(3.0, 1.0, 60)
    result = krige(data, loadings, eigenvalues, noise_variance, target_loadings=target_loadings,
                   mean=site_mean, target_mean=target_mean)
    assert result.mean.shape == (data.shape[0], 60)
    for t in range(data.shape[0]):
        expected_mean, expected_var = dense_krige(
            data[t], loadings, eigenvalues, noise_variance, target_loadings, site_mean, target_mean
        )
        np.testing.assert_allclose(result.mean[t], expected_mean, rtol=0, atol=1e-8)
        np.testing.assert_allclose(result.variance[t], expected_var + noise_variance, rtol=0, atol=1e-8)


def test_time_with_nothing_observed_gets_prior(problem):
    data, loadings, eigenvalues, noise_variance, site_mean = problem
    result = krige(data, loadings, eigenvalues, noise_variance, mean=site_mean)
    prior_variance = np.einsum("ik,k,ik->i", loadings, eigenvalues, loadings) + noise_variance
    np.testing.assert_allclose(result.mean[-2], site_mean, atol=1e-12)
    np.testing.assert_allclose(result.variance[-2], prior_variance, atol=1e-12)
    # observing data can only reduce the variance
    assert (result.variance <= prior_variance + 1e-12).all()


def test_intervals_and_result_fields(problem):
    data, loadings, eigenvalues, noise_variance, site_mean = problem
    result = krige(data, loadings, eigenvalues, noise_variance, mean=site_mean, level=0.8)
    assert isinstance(result, KrigingResult)
    q = norm.ppf(0.9)
    assert result.level == 0.8 and result.multiplier == pytest.approx(q)
    np.testing.assert_allclose(result.upper - result.mean, q * np.sqrt(result.variance))
    np.testing.assert_allclose(result.mean - result.lower, q * np.sqrt(result.variance))
    given = krige(data, loadings, eigenvalues, noise_variance, mean=site_mean, multiplier=3.0)
    np.testing.assert_allclose(given.upper - given.lower, 6.0 * np.sqrt(given.variance))
    np.testing.assert_array_equal(given.mean, result.mean)


def test_effective_rank_zero_gives_target_mean_and_noise_variance(problem):
    data, loadings, _, noise_variance, site_mean = problem
    zeros = np.zeros(loadings.shape[1])
    result = krige(data, loadings, zeros, noise_variance, mean=site_mean)
    np.testing.assert_array_equal(result.mean, np.broadcast_to(site_mean, data.shape))
    np.testing.assert_array_equal(result.variance, np.full(data.shape, noise_variance))
    latent = krige(data, loadings, zeros, noise_variance, mean=site_mean, include_noise=False)
    np.testing.assert_array_equal(latent.variance, 0.0)
    np.testing.assert_array_equal(latent.lower, latent.upper)


def test_inputs_not_modified(problem):
    data, loadings, eigenvalues, noise_variance, site_mean = problem
    copies = [a.copy() for a in (data, loadings, eigenvalues, site_mean)]
    krige(data, loadings, eigenvalues, noise_variance, mean=site_mean)
    for original, kept in zip((data, loadings, eigenvalues, site_mean), copies):
        np.testing.assert_array_equal(original, kept)


def test_low_rank_parts_for_a_fine_scale_term(problem):
    # posterior score means and observed remainders, the inputs of a later
    # simple-kriging step on the remainders
    data, loadings, eigenvalues, noise_variance, site_mean = problem
    positive = eigenvalues > 0
    parts = kriging._low_rank_krige(data - site_mean, loadings[:, positive], eigenvalues[positive],
                                    noise_variance, loadings[:, positive], return_remainders=True)
    observed = ~np.isnan(data)
    np.testing.assert_array_equal(np.isnan(parts.remainders), ~observed)
    smoothed = parts.scores @ loadings[:, positive].T
    np.testing.assert_allclose(parts.remainders[observed], (data - site_mean - smoothed)[observed])
    np.testing.assert_allclose(parts.mean, smoothed, atol=1e-12)


def model_draw(rng, n_sites, n_times, noise_variance, noise=None):
    x = np.linspace(0.0, 1.0, n_sites)
    loadings, _ = np.linalg.qr(np.column_stack([np.sin((k + 1) * np.pi * x) for k in range(3)]))
    eigenvalues = np.array([40.0, 15.0, 6.0])
    scores = rng.standard_normal((n_times, 3)) * np.sqrt(eigenvalues)
    if noise is None:
        noise = np.sqrt(noise_variance) * rng.standard_normal((n_times, n_sites))
    return loadings, eigenvalues, scores @ loadings.T + noise


def covered(truth, result, columns, rows=slice(None)):
    lower, upper = result.lower[rows][:, columns], result.upper[rows][:, columns]
    return np.mean((truth >= lower) & (truth <= upper))


def test_gaussian_intervals_calibrated_when_model_is_right():
    rng = np.random.default_rng(3)
    n_sites, n_times = 200, 300
    loadings, eigenvalues, truth = model_draw(rng, n_sites, n_times, 0.5)
    held_out = rng.choice(n_sites, 40, replace=False)
    data = truth.copy()
    data[rng.random(data.shape) < 0.2] = np.nan  # missingness varies by time
    data[:, held_out] = np.nan
    result = krige(data, loadings, eigenvalues, 0.5, level=0.9)
    coverage = covered(truth[:, held_out], result, held_out)  # 12,000 site-times
    assert abs(coverage - 0.90) < 0.02
    # the same through explicit target loadings (held-out sites as new targets)
    observed_sites = np.setdiff1d(np.arange(n_sites), held_out)
    direct = krige(data[:, observed_sites], loadings[observed_sites], eigenvalues, 0.5,
                   target_loadings=loadings[held_out])
    np.testing.assert_allclose(direct.mean, result.mean[:, held_out], atol=1e-10)
    np.testing.assert_allclose(direct.variance, result.variance[:, held_out], atol=1e-10)


def test_conformal_calibration_fixes_misspecified_noise():
    # true noise variance 1.0, the model is told 0.5: Gaussian intervals under-cover
    rng = np.random.default_rng(11)
    n_sites, n_times = 200, 1000
    loadings, eigenvalues, truth = model_draw(rng, n_sites, n_times, 1.0)
    held_out = rng.choice(n_sites, 40, replace=False)
    data = truth.copy()
    data[:, held_out] = np.nan
    calibration, fresh = slice(0, 500), slice(500, None)
    gaussian = krige(data, loadings, eigenvalues, 0.5)
    q = conformal_multiplier(truth[calibration][:, held_out], gaussian.mean[calibration][:, held_out],
                             gaussian.variance[calibration][:, held_out], level=0.9)
    assert q > norm.ppf(0.95) * 1.2
    calibrated = krige(data[fresh], loadings, eigenvalues, 0.5, multiplier=q)
    fresh_truth = truth[fresh][:, held_out]
    plain_coverage = covered(fresh_truth, gaussian, held_out, rows=fresh)
    conformal_coverage = covered(fresh_truth, calibrated, held_out)  # 20,000 site-times
    assert plain_coverage < 0.80
    # split conformal guarantees >= 0.90 in expectation; allow sampling error
    assert 0.89 <= conformal_coverage <= 0.92


def test_conformal_multiplier_small_exact_case():
    truth = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 0.0, 0.0, 0.0, 0.0, 0.0])
    mean = np.zeros(10)
    variance = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0, np.nan])
    # usable scores: 1, 2, 3, 4, 0, 0, 0, 0 (n = 8); ceil(9 * 0.5) = 5th smallest = 1
    assert conformal_multiplier(truth, mean, variance, level=0.5) == 1.0
    # ceil(9 * 0.75) = 7th smallest = 3
    assert conformal_multiplier(truth, mean, variance, level=0.75) == 3.0
    with pytest.raises(InputError, match="calibration set too small"):
        conformal_multiplier(truth, mean, variance, level=0.9)
    with pytest.raises(InputError, match="same shape"):
        conformal_multiplier(truth, mean[:5], variance)
    with pytest.raises(InputError, match="negative"):
        conformal_multiplier(truth, mean, -variance)


@pytest.mark.slow
def test_large_network_memory_bounded():
    rng = np.random.default_rng(0)
    n_sites, rank, n_times = 20_000, 10, 50
    loadings, _ = np.linalg.qr(rng.standard_normal((n_sites, rank)))
    eigenvalues = np.linspace(10.0, 1.0, rank)
    noise_variance = 0.09
    data = (rng.standard_normal((n_times, rank)) * np.sqrt(eigenvalues)) @ loadings.T
    data += np.sqrt(noise_variance) * rng.standard_normal(data.shape)
    masks = rng.random((5, n_sites)) < 0.3
    for t in range(n_times):
        data[t, masks[t % 5]] = np.nan
    data[7] = np.nan
    tracemalloc.start()
    try:
        result = krige(data, loadings, eigenvalues, noise_variance)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1e9  # a single |O| x |O| float64 matrix would be 1.96 GB
    assert np.isfinite(result.mean).all() and (result.variance > noise_variance).all()

    # one time checked against a matrix-free conjugate-gradient solve of Sigma_OO w = r_O
    observed = ~np.isnan(data[3])
    b_o = loadings[observed]

    def sigma_oo(v):
        return b_o @ (eigenvalues * (b_o.T @ v)) + noise_variance * v

    operator = LinearOperator((observed.sum(),) * 2, matvec=sigma_oo, dtype=float)
    weights, info = cg(operator, data[3, observed], rtol=1e-12, atol=0.0, maxiter=500)
    assert info == 0
    expected = loadings @ (eigenvalues * (b_o.T @ weights))
    np.testing.assert_allclose(result.mean[3], expected, atol=1e-8)


def test_bad_inputs_have_clear_messages(problem):
    data, loadings, eigenvalues, noise_variance, site_mean = problem
    with pytest.raises(InputError, match="data has 299 sites"):
        krige(data[:, :-1], loadings, eigenvalues, noise_variance)
    with pytest.raises(InputError, match="data must be a 2-D"):
        krige(data[0], loadings, eigenvalues, noise_variance)
    with pytest.raises(InputError, match=r"eigenvalues must have shape \(5,\)"):
        krige(data, loadings, eigenvalues[:3], noise_variance)
    with pytest.raises(InputError, match="eigenvalues must be finite and >= 0"):
        krige(data, loadings, -eigenvalues, noise_variance)
    for bad_noise in (-0.1, 0.0, np.nan):
        with pytest.raises(InputError, match="noise_variance must be a positive"):
            krige(data, loadings, eigenvalues, bad_noise)
    for bad_level in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(InputError, match="level must lie strictly between 0 and 1"):
            krige(data, loadings, eigenvalues, noise_variance, level=bad_level)
    with pytest.raises(InputError, match="multiplier"):
        krige(data, loadings, eigenvalues, noise_variance, multiplier=-1.0)
    with pytest.raises(InputError, match="target_loadings has 4 columns"):
        krige(data, loadings, eigenvalues, noise_variance, target_loadings=loadings[:, :4])
    with pytest.raises(InputError, match="target_mean is missing"):
        krige(data, loadings, eigenvalues, noise_variance, target_loadings=loadings[:10], mean=site_mean)
    with pytest.raises(InputError, match=r"mean must have shape \(300,\)"):
        krige(data, loadings, eigenvalues, noise_variance, mean=site_mean[:10])
    with pytest.raises(InputError, match=r"target_mean must have shape \(10,\)"):
        krige(data, loadings, eigenvalues, noise_variance, target_loadings=loadings[:10],
              mean=site_mean, target_mean=site_mean)
    infinite = data.copy()
    infinite[0, 0] = np.inf
    with pytest.raises(InputError, match="infinite"):
        krige(infinite, loadings, eigenvalues, noise_variance)
    bad_loadings = loadings.copy()
    bad_loadings[2, 1] = np.nan
    with pytest.raises(InputError, match="loadings contain NaN"):
        krige(data, bad_loadings, eigenvalues, noise_variance)
    assert issubclass(InputError, ValueError)


def test_posterior_time_by_time_equals_pattern_by_pattern(monkeypatch):
    """Gaps at random (a pattern per time) take the all-times posterior; it equals the
    per-pattern Woodbury solution, scores, remainders and empty times included."""
    from xadapter.engine import kriging as engine

    rng = np.random.default_rng(0)
    loadings = np.linalg.qr(rng.normal(size=(40, 3)))[0] * 3.0
    targets = rng.normal(size=(7, 3))
    eigenvalues = np.array([5.0, 2.0, 0.5])
    data = rng.normal(size=(50, 40))
    data[rng.random(data.shape) < 0.1] = np.nan
    data[3] = np.nan
    assert engine.prefers_posterior_by_time(data)
    by_time = engine._low_rank_krige(data, loadings, eigenvalues, 0.4, targets, return_remainders=True)
    monkeypatch.setattr(engine, "prefers_posterior_by_time", lambda centred: False)
    by_pattern = engine._low_rank_krige(data, loadings, eigenvalues, 0.4, targets, return_remainders=True)
    for name in ("mean", "variance", "scores", "remainders"):
        np.testing.assert_allclose(getattr(by_time, name), getattr(by_pattern, name), atol=1e-12)
    np.testing.assert_allclose(by_time.variance[3], np.einsum("pk,k,pk->p", targets, eigenvalues, targets))


@pytest.mark.parametrize("shape", [(243, 38), (50, 3), (100, 17), (30, 64), (7, 9)])
def test_unique_rows_equal_numpys_unique_along_rows(shape):
    """Packed-row patterns of gaps: the same distinct rows, in the same order, and the
    same index of each row, as ``np.unique(axis=0)``."""
    from xadapter.engine.kriging import unique_rows

    rng = np.random.default_rng(shape[0])
    mask = rng.random(shape) > 0.3
    mask[::3] = mask[0]  # repeated rows
    patterns, inverse = unique_rows(mask)
    expected, expected_inverse = np.unique(mask, axis=0, return_inverse=True)
    np.testing.assert_array_equal(patterns, expected)
    np.testing.assert_array_equal(inverse, np.ravel(expected_inverse))
    np.testing.assert_array_equal(patterns[inverse], mask)
