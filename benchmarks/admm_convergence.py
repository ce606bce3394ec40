"""Iterations and wall time of the fit loop with default settings on station networks.

With a trend the loop is the ADMM; without one (the "gaps without a trend" case) the
Anderson-accelerated alternation of gap fill and basis step.

The reference case is an ordinary daily station network: 300 stations, 365 days,
a smooth rank-3 field with AR(1) scores, noise, 20 % of the entries missing at random
and a residual trend on two covariates; the adapter uses the defaults of
:class:`xadapter.SpatialAdapter` (nominal rank 10). Three variations: no gaps with a
trend, gaps without a trend, and a smaller network.

Run ``python benchmarks/admm_convergence.py`` (add ``--model`` to also time a whole
``SpatialAdapter(...).fit``, which includes the fine scale and the site CV).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import xarray as xr

from xadapter import datasets
from xadapter.engine.admm import fit_adapter
from xadapter.engine.basis import subspace_distance


def station_case(n_stations=300, n_times=365, missing=0.2, trend=True, seed=0):
    """``(residual DataArray, covariates DataArray or None, true coefficients)``."""
    field = datasets.synthetic_field(n_times, n_stations=n_stations, rank=3, noise_sd=1.0,
                                     ar_coefficient=0.7, missing=missing, seed=seed)
    resid = field["residual"]
    if not trend:
        return resid, None, None
    rng = np.random.default_rng(seed + 100)
    day = np.arange(n_times)
    # a seasonal cycle and a station-and-time varying covariate (e.g. elevation x wind)
    seasonal = np.broadcast_to(np.cos(2 * np.pi * day / 365.0)[:, None], (n_times, n_stations))
    varying = rng.standard_normal((n_times, n_stations))
    cov = xr.DataArray(np.stack([seasonal, varying], axis=-1), dims=("time", "station", "feature"),
                       coords={"time": resid["time"], "station": resid["station"], "feature": ["season", "x"]})
    coef = np.array([1.5, -0.8])
    resid = resid + (cov * xr.DataArray(coef, dims="feature", coords={"feature": ["season", "x"]})).sum("feature")
    return resid, cov, coef


def run(resid, cov, **kwargs):
    data = resid.transpose("time", "station").values
    covariates = None if cov is None else cov.transpose("time", "station", "feature").values
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_adapter(data, kwargs.pop("rank", 10), covariates=covariates, **kwargs)
    elapsed = time.perf_counter() - start
    warned = any("stopping rule" in str(w.message) for w in caught)
    return fit, elapsed, warned


CASES = {
    "300 st x 365 d, 20 % gaps, trend": dict(missing=0.2, trend=True),
    "300 st x 365 d, no gaps, trend": dict(missing=0.0, trend=True),
    "300 st x 365 d, 20 % gaps, no trend": dict(missing=0.2, trend=False),
    "80 st x 120 d, 20 % gaps, trend": dict(n_stations=80, n_times=120, missing=0.2, trend=True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="store_true", help="also time SpatialAdapter().fit")
    parser.add_argument("--reference", action="store_true", help="compare with a tight long run")
    args = parser.parse_args()
    for name, case in CASES.items():
        resid, cov, coef = station_case(**case)
        fit, elapsed, warned = run(resid, cov)
        line = (f"{name:<38} iterations {fit.n_iter:>4}  converged {fit.converged!s:<5} "
                f"warned {warned!s:<5} {elapsed:6.2f} s")
        if args.reference:
            ref, _, _ = run(resid, cov, tol_rel=1e-9, tol_abs=1e-10, max_iter=5000)
            line += f"  | ref {ref.n_iter} it, subspace {subspace_distance(fit.basis, ref.basis):.1e}"
            if coef is not None:
                line += f", |dtheta| {np.max(np.abs(fit.trend_coef - ref.trend_coef)):.1e}"
        print(line, flush=True)
        if args.model and name.startswith("300 st x 365 d, 20 % gaps, trend"):
            from xadapter import SpatialAdapter

            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                adapter = SpatialAdapter().fit(resid, covariates=cov)
            print(f"{'  SpatialAdapter().fit':<38} iterations {int(adapter.history['iteration'].size):>4}  "
                  f"warnings {[str(w.message)[:60] for w in caught]}  {time.perf_counter() - start:6.2f} s")


if __name__ == "__main__":
    main()
