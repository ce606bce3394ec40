"""Binary targets: logit-scale residuals, kriging of labels, predictive probabilities, scores."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.integrate import quad
from scipy.special import expit, logit

import xadapter
from xadapter.engine import binary, classification
from xadapter.engine.geometry import local_projection_km
from xadapter.exceptions import InputError


def _patches(n_times, seed=0, n=16):
    """A patch grid: first-stage logit, true logit = first stage + low rank + noise, 0/1 labels."""
    rng = np.random.default_rng(seed)
    lat, lon = np.linspace(30, 38, n), np.linspace(-100, -92, n)
    lat_g, lon_g = np.meshgrid(lat, lon, indexing="ij")
    xy = local_projection_km(lat_g.ravel(), lon_g.ravel())
    centres = xy[rng.choice(n * n, 2, replace=False)]
    basis = np.linalg.qr(np.exp(-((xy[:, None] - centres[None]) ** 2).sum(-1) / (2 * 250.0**2)))[0]
    scores = rng.standard_normal((n_times, 2)) * np.sqrt([400.0, 200.0])
    first = rng.standard_normal((n_times, n * n)) - 0.3
    truth = first + scores @ basis.T + 0.3 * rng.standard_normal((n_times, n * n))
    labels = (rng.uniform(size=truth.shape) < expit(truth)).astype(float)
    shape, dims = (n_times, n, n), ("time", "lat", "lon")
    coords = {"time": pd.date_range("2020-01-01", periods=n_times), "lat": lat, "lon": lon}
    return xr.Dataset({"y": (dims, labels.reshape(shape)), "p": (dims, expit(first).reshape(shape))}, coords=coords)


@pytest.fixture(scope="module")
def patch_case():
    ds = _patches(260, seed=1)
    train, test = ds.isel(time=slice(0, 200)), ds.isel(time=slice(200, None))
    adapter = train.sadapter.fit(target="y", prediction="p", task="binary", rank=5, fine_scale=None,
                                 site_folds=None)
    seen = np.random.default_rng(5).uniform(size=test["y"].shape) < 0.3
    return adapter, test, seen


def test_residuals_match_their_closed_forms():
    y = np.array([0.0, 1.0, 1.0, np.nan, 0.5])
    p = np.array([0.2, 0.7, 0.999, 0.5, 0.5])
    working = binary.residual(y, p, "working", clip=0.01)
    clipped_p = np.clip(p, 0.01, 0.99)  # a confident first stage is clipped to [c, 1 - c]
    weight = np.maximum(clipped_p * (1 - clipped_p), 0.01 * 0.99)
    np.testing.assert_allclose(working, (y - clipped_p) / weight)
    assert np.isnan(working[3])
    clipped = binary.residual(y, p, "logit", clip=0.01)
    np.testing.assert_allclose(clipped, logit(np.clip(y, 0.01, 0.99)) - logit(np.clip(p, 0.01, 0.99)))
    # logits as the first stage give the same residual as their probabilities (away from
    # the clip: logits are finite and are not clipped)
    inside = np.array([0, 1, 3, 4])
    np.testing.assert_allclose(binary.residual(y, logit(p), "working", scale="logit")[inside],
                               binary.residual(y, p, "working")[inside], atol=1e-9)
    # the working residual is unbiased for the logit offset to first order
    for q_true, p_first in ((0.52, 0.5), (0.31, 0.3)):
        expected = (q_true - p_first) / (p_first * (1 - p_first))
        assert expected == pytest.approx(logit(q_true) - logit(p_first), rel=0.03)


@pytest.mark.parametrize("bad", [np.array([1.2, 0.5]), np.array([-0.1, 0.5])])
def test_probabilities_outside_the_unit_interval_are_refused(bad):
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        binary.residual(np.array([1.0, 0.0]), bad)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        binary.residual(bad, np.array([0.3, 0.4]))


def test_logistic_normal_mean_matches_numerical_integration():
    for m, v in ((0.0, 1.0), (1.5, 0.3), (-2.0, 4.0), (3.0, 9.0), (0.0, 25.0)):
        exact = quad(lambda z: expit(z) * np.exp(-(z - m) ** 2 / (2 * v)) / np.sqrt(2 * np.pi * v),
                     m - 12 * np.sqrt(v), m + 12 * np.sqrt(v), epsabs=1e-13, limit=200)[0]
        assert binary.logistic_normal_mean(m, v) == pytest.approx(exact, abs=1e-9)
        assert binary.logistic_normal_mean(m, v, "probit") == pytest.approx(exact, abs=0.02)
    lower, upper = binary.logistic_normal_interval(np.array([0.5]), np.array([4.0]), 1.6448536269514722)
    assert lower[0] == pytest.approx(expit(0.5 - 1.6448536269514722 * 2))
    assert upper[0] == pytest.approx(expit(0.5 + 1.6448536269514722 * 2))


def test_classification_scores_match_direct_computations():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=400)
    y = (rng.uniform(size=400) < p).astype(float)
    p[:20] = np.round(p[:20], 1)  # ties
    pairs = [(a, b) for a in p[y == 1] for b in p[y == 0]]
    brute_auc = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert classification.auc(y, p) == pytest.approx(brute_auc, abs=1e-12)
    assert classification.brier(y, p) == pytest.approx(np.mean((p - y) ** 2))
    assert classification.accuracy(y, p) == pytest.approx(np.mean((p > 0.5) == (y == 1)))
    ece = 0.0
    for b in range(10):
        inside = (p >= b / 10) & ((p < (b + 1) / 10) | (b == 9))
        if inside.any():
            ece += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    assert classification.expected_calibration_error(y, p) == pytest.approx(ece, abs=1e-12)
    with pytest.raises(InputError, match="0 or 1"):
        classification.brier(np.array([0.5]), np.array([0.5]))


def test_adapter_improves_brier_and_calibration_over_the_first_stage(patch_case):
    adapter, test, seen = patch_case
    assert adapter.task == "binary" and adapter.effective_rank >= 2
    kriged = adapter.krige(test["y"].where(seen), first_stage=test["p"])
    assert set(kriged.data_vars) == {"mean", "variance", "probability", "lower", "upper"}
    hidden = ~seen
    y = test["y"].values[hidden]
    first, adapted = test["p"].values[hidden], kriged["probability"].values[hidden]
    assert classification.brier(y, adapted) < 0.9 * classification.brier(y, first)
    assert classification.expected_calibration_error(y, adapted) < classification.expected_calibration_error(y, first)
    assert classification.auc(y, adapted) > classification.auc(y, first) + 0.05
    # probability is the logistic-normal mean of the latent logit, inside its interval
    np.testing.assert_allclose(kriged["probability"].values,
                               binary.logistic_normal_mean(kriged["mean"].values, kriged["variance"].values))
    assert np.all(kriged["lower"].values <= kriged["probability"].values)
    assert np.all(kriged["probability"].values <= kriged["upper"].values)
    # the latent mean is the first-stage logit plus the kriged working residual
    residual = adapter.residual(test["y"].where(seen), test["p"])
    latent = adapter._krige_residuals(residual, None, 0.9, False, None, None, None)  # the Gaussian path
    np.testing.assert_allclose(kriged["mean"].values, latent["mean"].values + logit(test["p"].values), atol=1e-10)
    np.testing.assert_allclose(kriged["variance"].values, latent["variance"].values)


def test_binary_adapter_round_trips_and_refuses_bad_input(patch_case, tmp_path):
    adapter, test, seen = patch_case
    adapter.to_netcdf(tmp_path / "b.nc")
    loaded = xadapter.load(tmp_path / "b.nc")
    assert loaded.task == "binary" and loaded.binary_residual == "working"
    observed = test["y"].where(seen).isel(time=slice(0, 5))
    first = test["p"].isel(time=slice(0, 5))
    xr.testing.assert_identical(loaded.krige(observed, first_stage=first).drop_attrs(),
                                adapter.krige(observed, first_stage=first).drop_attrs())
    with pytest.raises(InputError, match="first_stage"):
        adapter.krige(observed)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        adapter.krige(observed, first_stage=first * 2)
    ds = test.assign(p=test["p"] + 1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ds.sadapter.fit(target="y", prediction="p", task="binary", rank=3)
    with pytest.raises(InputError, match="prediction"):
        test.sadapter.fit(target="y", task="binary", rank=3)
    with pytest.raises(InputError, match="binary_residual"):
        xadapter.SpatialAdapter(binary_residual="pearson").settings()
