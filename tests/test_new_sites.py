"""Kriging at sites the adapter never saw, through the extended basis (issue: unseen sites)."""

import numpy as np
import pytest

from xadapter import SpatialAdapter, datasets, metrics
from xadapter.engine.geometry import great_circle_km


def idw(observed, obs_lat, obs_lon, lat, lon, power=2.0):
    """Inverse-distance weighting of observed residuals, an independent baseline."""
    dist = great_circle_km(lat[:, None], lon[:, None], obs_lat[None, :], obs_lon[None, :])
    weights = 1.0 / np.maximum(dist, 1e-6) ** power
    weights /= weights.sum(axis=1, keepdims=True)
    return observed @ weights.T


@pytest.fixture(scope="module")
def split_field():
    field = datasets.synthetic_field(300, grid=(16, 16), rank=3, score_variance=(600.0, 300.0, 150.0),
                                     ar_coefficient=0.7, noise_sd=1.0, length_km=500.0, seed=7)
    cells = datasets.grid_to_cells(field["residual"])
    signal = datasets.grid_to_cells(field["true_signal"])
    rng = np.random.default_rng(0)
    held = np.zeros(cells.sizes["cell"], bool)
    held[rng.choice(held.size, held.size // 5, replace=False)] = True
    return cells, signal, held


@pytest.mark.parametrize("fine_scale", [None, "exponential"])
def test_kriging_unseen_sites_beats_first_stage_and_idw(split_field, fine_scale):
    cells, signal, held = split_field
    train, test = cells.isel(cell=~held), cells.isel(cell=held)
    adapter = SpatialAdapter(rank=8, fine_scale=fine_scale, seed=0).fit(train.isel(time=slice(0, 200)))
    observed = train.isel(time=slice(200, None))
    result = adapter.krige(observed, at=test.isel(time=0, drop=True))
    truth = test.isel(time=slice(200, None)).values
    mean = result["mean"].transpose("time", "cell").values
    variance = result["variance"].transpose("time", "cell").values
    rmse = metrics.rmse(truth, mean)
    first_stage = metrics.rmse(truth, np.zeros_like(truth))
    baseline = idw(observed.values, observed["lat"].values, observed["lon"].values,
                   test["lat"].values, test["lon"].values)
    idw_rmse = metrics.rmse(truth, baseline)
    crps = metrics.crps_gaussian(truth, mean, variance)
    lower = result["lower"].transpose("time", "cell").values
    upper = result["upper"].transpose("time", "cell").values
    coverage = metrics.coverage(truth, lower, upper)
    print(f"fine_scale={fine_scale}: RMSE {rmse:.3f} (first stage {first_stage:.3f}, IDW {idw_rmse:.3f}), "
          f"CRPS {crps:.3f}, 90 % coverage {coverage:.3f}")
    assert rmse < 0.75 * first_stage
    assert rmse < idw_rmse
    # the noise floor is 1.0: the signal itself is recovered much better than IDW
    latent = metrics.rmse(signal.isel(cell=held, time=slice(200, None)).values, mean)
    assert latent < 0.6
    assert 0.85 <= coverage <= 0.95
