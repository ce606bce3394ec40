"""
00 - Ozone at grid cells never seen in training
===============================================

The bundled real data: monthly total column ozone over Central America (24 x 24
cells of 2.5 degrees, 1995-2000). A frozen first stage (least squares on latitude,
longitude and seasonal harmonics, fitted on the first 48 months) leaves a residual
field with smooth large-scale structure. We

1. hide 20 % of the cells completely (they are never seen in training),
2. fit a spatial adapter on the residuals of the other cells over months 1-48,
3. krige the residual over the whole grid in each of months 49-72 from the cells
   observed that month, and score the hidden cells against the first stage alone.

The maps show the leading basis functions, the kriged mean and variance of one month
(black dots: the observed cells; the variance is larger at the hidden cells, where
the cross-validation over sites calibrates it) and the diagnostics of the fit.

Run ``python 00_ozone_unseen_cells.py``; the PNGs go to the folder named by the
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
N_TRAIN = 48

# %% Residuals of the frozen first stage, as station-like cells
ds = datasets.ozone_residuals(n_train=N_TRAIN)
cells = datasets.grid_to_cells(ds["residual"])  # (time, cell) with lat/lon coordinates
rng = np.random.default_rng(0)
hidden = np.zeros(cells.sizes["cell"], bool)
hidden[rng.choice(hidden.size, int(0.2 * hidden.size), replace=False)] = True
observed_cells = cells.isel(cell=~hidden)

# %% Fit on the observed cells over the training months
adapter = SpatialAdapter(rank=10).fit(observed_cells.isel(time=slice(0, N_TRAIN)))
print(adapter)

# %% Krige the whole grid in the test months from the observed cells
grid = xr.Dataset(coords={"lat": ds["lat"], "lon": ds["lon"]})
maps = adapter.krige(observed_cells.isel(time=slice(N_TRAIN, None)), at=grid, level=0.9)

# skill at the hidden cells: the residual is what the first stage got wrong, so the
# first stage alone predicts a residual of 0
test = datasets.grid_to_cells(maps.transpose("time", "lat", "lon")).isel(cell=hidden)
truth = cells.isel(time=slice(N_TRAIN, None), cell=hidden).values
print(f"hidden cells, months {N_TRAIN + 1}-{cells.sizes['time']}:")
print(f"  RMSE first stage alone   {metrics.rmse(truth, np.zeros_like(truth)):.2f} DU")
print(f"  RMSE with the adapter    {metrics.rmse(truth, test['mean'].values):.2f} DU")
print(f"  coverage of 90 % bounds  {metrics.coverage(truth, test['lower'].values, test['upper'].values):.2f}")

# %% Figures
plot.basis_maps(adapter, modes=4, ncols=4).savefig(OUTPUT / "00_ozone_basis.png", dpi=90)
plot.kriging_maps(maps, time="2000-06-01", sites=observed_cells).savefig(OUTPUT / "00_ozone_kriging.png", dpi=90)

fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
plot.eigenvalue_spectrum(adapter, ax=axes[0])
plot.calibration_plot(adapter, ax=axes[1])
fig.savefig(OUTPUT / "00_ozone_diagnostics.png", dpi=90)
print(f"wrote 00_ozone_*.png to {OUTPUT.resolve()}")
