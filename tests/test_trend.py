import numpy as np
import pytest

from xadapter.exceptions import InputError
from xadapter.engine.trend import Covariates, as_covariates, evaluate_trend, fit_trend

T, N, P = 23, 17, 3


def _expanded(covariates):
    """Independent (T, N, p) design from any layout, by explicit loops."""
    out = np.empty((T, N, covariates.shape[-1]))
    for t in range(T):
        for s in range(N):
            if covariates.ndim == 3:
                out[t, s] = covariates[t, s]
            elif covariates.shape[0] == T:
                out[t, s] = covariates[t]
            else:
                out[t, s] = covariates[s]
    return out


def _reference(target, covariates, ridge, mask):
    """Ridge by lstsq on the augmented expanded design, observed entries only."""
    design = _expanded(covariates)[mask]
    y = target[mask]
    augmented = np.vstack([design, np.sqrt(ridge) * np.eye(covariates.shape[-1])])
    rhs = np.concatenate([y, np.zeros(covariates.shape[-1])])
    return np.linalg.lstsq(augmented, rhs, rcond=None)[0]


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.mark.parametrize("shape", [(T, N, P), (T, P), (N, P)], ids=["time-space", "time", "space"])
@pytest.mark.parametrize("ridge", [0.0, 2.5])
def test_ridge_matches_lstsq_on_expanded_design(rng, shape, ridge):
    covariates = rng.standard_normal(shape) + 0.3
    theta_true = np.array([1.5, -2.0, 0.7])
    target = _expanded(covariates) @ theta_true + 0.5 * rng.standard_normal((T, N))
    mask = rng.uniform(size=(T, N)) > 0.3
    mask[4] = False  # a time with no observation
    target_nan = np.where(mask, target, np.nan)

    theta = fit_trend(target_nan, covariates, ridge=ridge)  # mask from NaN
    reference = _reference(target, covariates, ridge, mask)
    np.testing.assert_allclose(theta, reference, rtol=1e-10, atol=1e-12)
    # an explicit mask ignores whatever sits at the masked-out entries
    theta_masked = fit_trend(np.where(mask, target, 1e6), covariates, ridge=ridge, mask=mask)
    np.testing.assert_allclose(theta_masked, reference, rtol=1e-10, atol=1e-12)
    if ridge == 0.0:
        # no ridge, every entry: plain least squares
        full = np.linalg.lstsq(_expanded(covariates).reshape(-1, P), target.ravel(), rcond=None)[0]
        np.testing.assert_allclose(fit_trend(target, covariates, ridge=0.0), full, rtol=1e-10)


@pytest.mark.parametrize("shape", [(T, N, P), (T, P), (N, P)], ids=["time-space", "time", "space"])
def test_evaluate_matches_expanded_product(rng, shape):
    covariates = rng.standard_normal(shape)
    theta = rng.standard_normal(P)
    trend = evaluate_trend(covariates, theta, T, N)
    assert trend.shape == (T, N)
    np.testing.assert_allclose(trend, _expanded(covariates) @ theta, rtol=1e-12, atol=1e-12)
    trend[0, 0] = 99.0  # a writable copy, not a broadcast view
    assert not np.any(covariates == 99.0)


def test_rows_of_a_window_match_full_evaluation(rng):
    for shape in [(T, N, P), (T, P), (N, P)]:
        cov = as_covariates(rng.standard_normal(shape), T, N)
        theta = rng.standard_normal(P)
        window = cov.rows(slice(5, 11))
        assert window.n_times == 6
        np.testing.assert_allclose(window.evaluate(theta), cov.evaluate(theta)[5:11])


def test_inputs_not_modified(rng):
    covariates = rng.standard_normal((T, P))
    target = rng.standard_normal((T, N))
    target[0, 0] = np.nan
    c0, t0 = covariates.copy(), target.copy()
    fit_trend(target, covariates)
    np.testing.assert_array_equal(covariates, c0)
    np.testing.assert_array_equal(target, t0)


def test_layout_detection_and_ambiguity(rng):
    assert as_covariates(rng.standard_normal((T, P)), T, N).layout == "time"
    assert as_covariates(rng.standard_normal((N, P)), T, N).layout == "space"
    assert as_covariates(rng.standard_normal((T, N, P)), T, N).layout == "time-space"
    square = rng.standard_normal((10, P))
    with pytest.raises(InputError, match="ambiguous.*layout="):
        as_covariates(square, 10, 10)
    assert as_covariates(square, 10, 10, layout="space").layout == "space"
    assert isinstance(as_covariates(square, 10, 10, layout="time"), Covariates)


@pytest.mark.parametrize(
    "covariates, match",
    [
        (np.zeros((5, P)), r"\(T, p\) = \(23, p\) or \(N, p\) = \(17, p\)"),
        (np.zeros(T), "trailing feature axis"),
        (np.zeros((T, N + 1, P)), r"\(T, N, p\) = \(23, 17, p\)"),
        (np.zeros((T, 0)), "no feature.*covariates=None"),
        (np.array([["a"] * P] * T), "real numbers"),
    ],
)
def test_shape_and_type_errors(covariates, match):
    with pytest.raises(InputError, match=match):
        as_covariates(covariates, T, N)


def test_nan_covariates_and_bad_targets(rng):
    covariates = rng.standard_normal((T, N, P))
    covariates[3, 2, 1] = np.nan
    with pytest.raises(InputError, match=r"1 NaN.*features \[1\].*cannot be missing"):
        as_covariates(covariates, T, N)
    good = rng.standard_normal((T, P))
    with pytest.raises(InputError, match="no observed entry"):
        fit_trend(np.full((T, N), np.nan), good)
    target = rng.standard_normal((T, N))
    target[0, 0] = np.nan
    with pytest.raises(InputError, match="mask marks as observed"):
        fit_trend(target, good, mask=np.ones((T, N), bool))
    with pytest.raises(InputError, match="ridge must be finite and >= 0"):
        fit_trend(target, good, ridge=-1.0)
    with pytest.raises(InputError, match="collinear"):
        fit_trend(rng.standard_normal((T, N)), np.hstack([good, good[:, :1]]), ridge=0.0)
    with pytest.raises(InputError, match=r"theta must have shape \(3,\)"):
        evaluate_trend(good, np.ones(2), T, N)
