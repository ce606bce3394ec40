"""
02 - Choosing the rank and the smoothness
=========================================

Two settings shape an adapter: how many basis functions carry signal (the effective
rank) and how smooth they are (``tau1``, the weight of the thin-plate or graph
penalty). Here 120 stations report for only 30 days, so the sample covariance is
noisy and the plain eigenvectors pick up that noise.

1. ``rank="auto"`` fits ``K = 10`` basis functions (more, up to
   ``min(20, N - 1, T - 2)``, only when all ten carry signal) and chooses the
   effective rank by cross-validation over sites on the kriging CRPS (never above
   the spectral threshold's rank). The selection plot shows the CRPS of
   every candidate; the spectrum shows the sample eigenvalues against the kept,
   thresholded ones and the noise variance.
2. ``tau1`` trades fit for smoothness. A scan over a few values, each scored by the
   same cross-validation over sites (``adapter.state.attrs["cv_crps"]``), and the
   known true patterns show what smoothing buys: the maps of the first basis
   functions without and with the penalty.

Run ``python 02_rank_and_smoothness.py``; the PNGs go to the folder named by the
``XADAPTER_EXAMPLES_OUTPUT`` environment variable (default: the current directory).
"""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files only; no window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xadapter import SpatialAdapter, datasets, plot  # noqa: E402

OUTPUT = Path(os.environ.get("XADAPTER_EXAMPLES_OUTPUT", "."))
OUTPUT.mkdir(parents=True, exist_ok=True)

field = datasets.synthetic_field(30, n_stations=120, rank=3, score_variance=(60.0, 30.0, 15.0),
                                 noise_sd=1.0, seed=4)
residual, true_basis = field["residual"], field["true_basis"].values


def cosines_to_truth(adapter):
    """Cosines of the principal angles between the first 3 basis functions and the truth."""
    basis = adapter.basis.isel(mode=slice(0, 3)).values
    return np.linalg.svd(basis.T @ true_basis, compute_uv=False)


# %% 1. The effective rank by cross-validation over sites
auto = SpatialAdapter(rank="auto").fit(residual)
print(auto)

fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
plot.selection_plot(auto, ax=axes[0])
plot.eigenvalue_spectrum(auto, ax=axes[1])
fig.savefig(OUTPUT / "02_rank_selection.png", dpi=90)

# %% 2. Smoothness: scan tau1 at the chosen rank
rank = max(auto.effective_rank, 1)
scan = {}
for tau1 in (0.0, 1e4, 1e5, 3e5, 1e6):
    adapter = SpatialAdapter(rank=rank, tau1=tau1).fit(residual)
    scan[tau1] = adapter
    print(f"tau1 = {tau1:8.0f}   site-CV CRPS {adapter.state.attrs['cv_crps']:.4f} K   "
          f"cosines to the true basis {np.round(cosines_to_truth(adapter), 3)}")
best = min(scan, key=lambda t: scan[t].state.attrs["cv_crps"])
print(f"lowest CRPS at tau1 = {best:g}")

modes = list(range(min(rank, 3)))
fig = plt.figure(figsize=(4.2 * len(modes), 7.6), layout="constrained")
for row, tau1 in zip(fig.subfigures(2, 1), (0.0, best)):
    plot.basis_maps(scan[tau1], modes=modes, axes=row.subplots(1, len(modes)))
    cosines = ", ".join(f"{c:.2f}" for c in cosines_to_truth(scan[tau1]))
    row.suptitle(f"tau1 = {tau1:g}   (cosines to the true basis: {cosines})")
fig.savefig(OUTPUT / "02_smoothness_basis.png", dpi=90)
print(f"wrote 02_*.png to {OUTPUT.resolve()}")
