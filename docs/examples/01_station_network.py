"""
01 - A station network with gaps, kriged onto a grid
====================================================

Scattered stations report a residual (observation minus forecast) every day; 10 % of
the reports are missing at random. The field is synthetic, so the truth is known:
three smooth patterns with AR(1) scores plus white noise
(:func:`xadapter.datasets.synthetic_field`).

1. Fit an adapter on the first 180 days. Missing values make the fit iterate
   (without a trend, an Anderson-accelerated alternation of the gap fill and the basis
   step; with one, the three-block ADMM), so its convergence history is worth a look.
2. Compare the fitted basis with the true patterns (cosines of the principal angles
   between the two subspaces).
3. On a later day, 30 % of the stations report nothing. Krige that day's residual
   onto a regular 0.5 degree grid from the stations that did report, and score the
   silent stations against the true signal.

Run ``python 01_station_network.py``; the PNGs go to the folder named by the
``XADAPTER_EXAMPLES_OUTPUT`` environment variable (default: the current directory).
"""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files only; no window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from xadapter import SpatialAdapter, datasets, metrics, plot  # noqa: E402

OUTPUT = Path(os.environ.get("XADAPTER_EXAMPLES_OUTPUT", "."))
OUTPUT.mkdir(parents=True, exist_ok=True)
N_TRAIN, DAY = 180, 200

# %% A synthetic station network with known truth
field = datasets.synthetic_field(240, n_stations=150, rank=3, score_variance=(400.0, 200.0, 100.0),
                                 noise_sd=1.0, missing=0.1, seed=3)
residual = field["residual"]  # (time, station), K, NaN where missing

# %% Fit on the training days
adapter = SpatialAdapter(rank=6).fit(residual.isel(time=slice(0, N_TRAIN)))
print(adapter)

kept = adapter.basis.isel(mode=slice(0, max(adapter.effective_rank, 1))).values
cosines = np.linalg.svd(kept.T @ field["true_basis"].values, compute_uv=False)
print("cosines of the principal angles, fitted vs true basis:", np.round(cosines, 3))

# %% A later day on which 30 % of the stations are silent
rng = np.random.default_rng(1)
silent = rng.uniform(size=residual.sizes["station"]) < 0.3
today = residual.isel(time=[DAY]).where(~xr.DataArray(silent, dims="station"))
reporting = today.isel(station=~silent)

# kriged at the silent stations (fitted sites: no extension needed)
at_stations = adapter.krige(today, include_noise=False)
truth = field["true_signal"].isel(time=[DAY], station=silent).values
predicted = at_stations["mean"].isel(station=silent).values
print(f"silent stations on day {DAY}: RMSE against the true signal {metrics.rmse(truth, predicted):.2f} K "
      f"(signal standard deviation {truth.std():.2f} K)")

# and onto a regular grid
grid = xr.Dataset(coords={"lat": np.arange(30.0, 45.01, 0.5), "lon": np.arange(-110.0, -89.99, 0.5)})
maps = adapter.krige(today, at=grid, include_noise=False)

# %% Figures
plot.basis_maps(adapter, modes=3).savefig(OUTPUT / "01_station_basis.png", dpi=90)
plot.kriging_maps(maps, sites=reporting).savefig(OUTPUT / "01_station_kriging.png", dpi=90)

fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
plot.convergence(adapter, ax=axes[0])
plot.calibration_plot(adapter, ax=axes[1])
fig.savefig(OUTPUT / "01_station_diagnostics.png", dpi=90)
print(f"wrote 01_station_*.png to {OUTPUT.resolve()}")
