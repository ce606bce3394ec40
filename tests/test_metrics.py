import numpy as np
import pytest
import xarray as xr
from scipy.integrate import quad
from scipy.stats import norm

from xadapter import metrics
from xadapter.exceptions import InputError


def crps_by_integration(y, m, s):
    below = quad(lambda x: norm.cdf(x, m, s) ** 2, -np.inf, y, epsabs=1e-12, epsrel=1e-12)[0]
    above = quad(lambda x: (norm.cdf(x, m, s) - 1.0) ** 2, y, np.inf, epsabs=1e-12, epsrel=1e-12)[0]
    return below + above


@pytest.mark.parametrize(
    "y, m, s",
    [
        (0.0, 0.0, 1.0), (1.3, -0.4, 0.7), (-5.0, 2.0, 3.0),
        (10.0, 9.99, 0.05), (0.2, 0.0, 12.0), (4.0, 0.0, 1.0),
    ],
)
def test_crps_closed_form_matches_numerical_integration(y, m, s):
    assert metrics.crps_gaussian(y, m, s**2) == pytest.approx(crps_by_integration(y, m, s), abs=1e-6)


def test_crps_mean_over_entries_and_limits():
    y = np.array([0.0, 1.3, -5.0])
    m = np.array([0.0, -0.4, 2.0])
    s = np.array([1.0, 0.7, 3.0])
    expected = np.mean([crps_by_integration(*args) for args in zip(y, m, s)])
    assert metrics.crps_gaussian(y, m, s**2) == pytest.approx(expected, abs=1e-6)
    # zero variance: the absolute error; at the mean: s (sqrt(2) - 1) / sqrt(pi)
    assert metrics.crps_gaussian(3.0, 1.0, 0.0) == pytest.approx(2.0)
    assert metrics.crps_gaussian(0.0, 0.0, 4.0) == pytest.approx(2.0 * (np.sqrt(2) - 1) / np.sqrt(np.pi))
    with pytest.raises(InputError, match="negative"):
        metrics.crps_gaussian(y, m, -s)


def test_known_small_cases():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    prediction = np.array([1.0, 2.0, 5.0, 3.0])
    assert metrics.rmse(truth, prediction) == pytest.approx(np.sqrt(5.0 / 4.0))
    assert metrics.mae(truth, prediction) == pytest.approx(3.0 / 4.0)
    lower = np.array([0.0, 2.5, 2.0, 3.0])
    upper = np.array([2.0, 3.0, 3.0, 5.0])
    # inside: 1 in [0, 2]; 2 below [2.5, 3]; 3 on the upper bound; 4 inside
    assert metrics.coverage(truth, lower, upper) == pytest.approx(0.75)
    assert metrics.interval_width(lower, upper) == pytest.approx((2.0 + 0.5 + 1.0 + 2.0) / 4)
    # level 0.8: alpha 0.2, penalty 2 / 0.2 = 10; only the second misses, by 0.5
    assert metrics.interval_score(truth, lower, upper, 0.8) == pytest.approx((5.5 + 10 * 0.5) / 4)
    above = metrics.interval_score([4.0], [0.0], [1.0], 0.5)
    assert above == pytest.approx(1.0 + 4.0 * 3.0)


def test_nan_entries_are_ignored():
    truth = np.array([1.0, np.nan, 3.0, 4.0])
    prediction = np.array([2.0, 0.0, 3.0, np.nan])
    assert metrics.rmse(truth, prediction) == pytest.approx(np.sqrt(0.5))
    assert metrics.mae(truth, prediction) == pytest.approx(0.5)
    variance = np.array([1.0, 1.0, np.nan, 1.0])
    expected = crps_by_integration(1.0, 2.0, 1.0)
    assert metrics.crps_gaussian(truth, prediction, variance) == pytest.approx(expected)
    lower = np.array([0.0, 0.0, np.nan, 3.0])
    upper = np.array([0.5, 1.0, 4.0, 5.0])
    assert metrics.coverage(truth, lower, upper) == pytest.approx(0.5)
    assert metrics.interval_width(lower, upper) == pytest.approx((0.5 + 1.0 + 2.0) / 3)
    assert metrics.interval_score(truth, lower, upper, 0.9) == pytest.approx((0.5 + 20 * 0.5 + 2.0) / 2)
    assert np.isnan(metrics.rmse([np.nan], [1.0]))


def test_axis_argument_matches_per_slice_results():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((6, 9))
    mean = truth + rng.standard_normal((6, 9))
    variance = rng.uniform(0.5, 2.0, (6, 9))
    truth[2, 3] = np.nan
    truth[4, :] = np.nan  # a row with nothing valid
    lower, upper = mean - 1.0, mean + 1.0
    for name, args in [
        ("rmse", (truth, mean)),
        ("mae", (truth, mean)),
        ("crps_gaussian", (truth, mean, variance)),
        ("coverage", (truth, lower, upper)),
        ("interval_width", (lower, upper)),
    ]:
        function = getattr(metrics, name)
        by_row = function(*args, axis=1)
        assert by_row.shape == (6,)
        for row in range(6):
            single = function(*(a[row] for a in args))
            if row == 4 and name != "interval_width":
                assert np.isnan(by_row[row]) and np.isnan(single)
            else:
                assert by_row[row] == pytest.approx(single)
        assert isinstance(function(*args), float)
    by_column = metrics.interval_score(truth, lower, upper, 0.9, axis=0)
    assert by_column.shape == (9,)
    assert by_column[3] == pytest.approx(metrics.interval_score(truth[:, 3], lower[:, 3], upper[:, 3], 0.9))


def test_accepts_dataarrays_and_broadcasting():
    truth = xr.DataArray(np.arange(6.0).reshape(2, 3), dims=("time", "station"))
    prediction = truth + 1.0
    assert metrics.rmse(truth, prediction) == pytest.approx(1.0)
    assert metrics.crps_gaussian(truth, prediction, 1.0) == pytest.approx(crps_by_integration(0.0, 1.0, 1.0))
    assert metrics.mae(np.zeros((2, 3)), np.array([1.0, 2.0, 3.0])) == pytest.approx(2.0)


def test_bad_inputs():
    with pytest.raises(InputError, match="broadcastable"):
        metrics.rmse(np.zeros(3), np.zeros(4))
    with pytest.raises(InputError, match="level"):
        metrics.interval_score([0.0], [0.0], [1.0], 1.0)
