"""Held-out-cell kriging on the bundled real ozone grid: the adapter against the field.

Split (the same for every contender): the frozen first stage (OLS on latitude,
longitude, their squares and product and seasonal harmonics,
:func:`xadapter.datasets.ozone_residuals`) is fitted on the first 48 months; 20 % of
the cells are held out; every contender predicts the residual at the held-out cells in
each of the last 24 months from the cells observed in the same month (and, for the
adapters and GSTools, from the training months of the observed cells). Repeated over
``--seeds`` splits of the cells (5 by default).

Contenders, all measured in the same run on the same splits:

* **first stage alone**: residual predicted as zero, Gaussian interval from the
  spread of the training residuals;
* **ordinary kriging, GSTools**, per test month: exponential variogram with nugget
  fitted once on the training months (per-month empirical variograms averaged); the
  nugget is added to the kriging variance (a new observation);
* **ordinary kriging, PyKrige**, per test month: exponential variogram fitted by
  PyKrige on that month's observed cells (its default workflow); its kriging
  variance already is that of a new observation;
* **inverse-distance weighting** (power 2, every observed cell), per test month, with
  a variance equal to the mean squared leave-one-out error of the observed cells of
  that month;
* **adapter, paper model**: ``gamma=0``, white noise, no cross-validation over sites,
  exact basis extension;
* **adapter, defaults**: ``SpatialAdapter()``;
* **adapter, rank="auto"**.

Scores over every held-out cell and test month: RMSE and MAE (DU), Gaussian CRPS,
coverage and mean width of 90 % intervals. Time of fit plus prediction: wall and CPU
(``time.process_time``, every thread of the process, BLAS included), median over the
seeds. Skill is the mean over seeds.

Targets of the defaults (issue 10): CRPS at least 5 % below every contender, RMSE no
worse than any, 90 % coverage within 0.90 +- 0.03, at least 10x less CPU time than
per-month GSTools kriging.

Run by hand::

    python benchmarks/bench_ozone_holdout.py [--seeds 5] [--no-gstools] [--no-pykrige]
    python benchmarks/bench_ozone_holdout.py --smoke        # 1 seed, 2 test months, no rank="auto"
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import xarray as xr

from xadapter import SpatialAdapter, datasets, metrics
from xadapter.engine.geometry_cache import clear_geometry_cache
from xadapter.engine.geometry import local_projection_km

from _common import fmt, machine_line, markdown_table, ratio, timed, verdict

N_TRAIN = 48
HOLDOUT = 0.2
LEVEL = 0.9
Z90 = 1.6448536269514722
IDW_POWER = 2.0
SMOKE_TEST_MONTHS = 2

PAPER_MODEL = {"gamma": 0.0, "fine_scale": None, "site_folds": None, "extension_smoothing": 0.0}

#: Name of the contender the targets are checked for, and of the CPU-time peer.
OURS = "adapter, defaults"
CPU_PEER = "ordinary kriging, GSTools"


@dataclass
class Outcome:
    """Predictions of one contender on one split, with its cost."""

    truth: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    wall: float = np.nan
    cpu: float = np.nan
    rank: float = np.nan


def gaussian_outcome(truth, mean, variance):
    """Outcome with central Gaussian 90 % intervals from ``mean`` and ``variance``."""
    variance = np.maximum(np.asarray(variance, dtype=float), 0.0)
    spread = Z90 * np.sqrt(variance)
    return Outcome(np.asarray(truth), np.asarray(mean), variance, mean - spread, mean + spread)


def split(resid, seed, holdout=HOLDOUT):
    """Boolean (lat, lon) mask of the held-out cells of one seed."""
    rng = np.random.default_rng(seed)
    shape = (resid.sizes["lat"], resid.sizes["lon"])
    hidden = np.zeros(shape[0] * shape[1], bool)
    hidden[rng.choice(hidden.size, int(round(holdout * hidden.size)), replace=False)] = True
    return xr.DataArray(hidden.reshape(shape), dims=("lat", "lon"), coords={"lat": resid.lat, "lon": resid.lon})


class Problem:
    """The arrays every contender sees for one split: cells in km, values (time, cell)."""

    def __init__(self, resid, hidden):
        lat2, lon2 = np.meshgrid(resid.lat.values, resid.lon.values, indexing="ij")
        self.xy = local_projection_km(lat2.ravel(), lon2.ravel())
        self.kept = ~hidden.values.ravel()
        self.values = resid.transpose("time", "lat", "lon").values.reshape(resid.sizes["time"], -1)
        self.train = self.values[:N_TRAIN][:, self.kept]
        self.test_observed = self.values[N_TRAIN:][:, self.kept]
        self.truth = self.values[N_TRAIN:][:, ~self.kept]
        self.observed_xy = self.xy[self.kept]
        self.target_xy = self.xy[~self.kept]


def run_first_stage(resid, hidden, problem):
    """The residual predicted as zero; interval from the training spread."""
    sd = float(np.std(problem.train))
    zero = np.zeros_like(problem.truth)
    outcome = gaussian_outcome(problem.truth, zero, np.full_like(zero, sd**2))
    outcome.wall = outcome.cpu = 0.0
    return outcome


def _adapter_predict(resid, hidden, settings):
    cells = datasets.grid_to_cells(resid)
    hidden_cells = hidden.stack(cell=("lat", "lon")).values
    train, test = cells.isel(cell=~hidden_cells), cells.isel(cell=hidden_cells)
    clear_geometry_cache()  # a cold fit, as a user's first: no geometry from the previous contender
    adapter = SpatialAdapter(**settings).fit(train.isel(time=slice(0, N_TRAIN)))
    result = adapter.krige(train.isel(time=slice(N_TRAIN, None)), at=test.isel(time=0, drop=True), level=LEVEL)
    return adapter, result.transpose("time", "cell")


def run_adapter(resid, hidden, problem, settings):
    """Fit on the training cells and months, krige the held-out cells each test month."""
    run = timed(_adapter_predict, resid, hidden, settings)
    adapter, pred = run.result
    outcome = Outcome(problem.truth, pred["mean"].values, pred["variance"].values,
                      pred["lower"].values, pred["upper"].values, run.wall, run.cpu, adapter.effective_rank)
    return outcome


def _gstools_predict(problem):
    import gstools as gs

    pos = (problem.observed_xy[:, 0], problem.observed_xy[:, 1])
    bins = np.linspace(0, 2500, 26)
    # pool the variogram over training months: average the per-month estimates
    gammas = []
    for month in problem.train:
        centre, gamma = gs.vario_estimate(pos, month - month.mean(), bins)
        gammas.append(gamma)
    model = gs.Exponential(dim=2)
    model.fit_variogram(centre, np.mean(gammas, axis=0), nugget=True)
    target = (problem.target_xy[:, 0], problem.target_xy[:, 1])
    mean, variance = [], []
    for month in problem.test_observed:
        krig = gs.krige.Ordinary(model, cond_pos=pos, cond_val=month)
        field, krige_var = krig(target, return_var=True)
        mean.append(field)
        # GSTools returns the variance of the latent field; a new observation adds the nugget
        variance.append(np.maximum(krige_var, 0) + model.nugget)
    return np.asarray(mean), np.asarray(variance)


def _timed_outcome(predict, problem):
    """Scores and wall/CPU time of ``predict(problem) -> (mean, variance)``."""
    run = timed(predict, problem)
    outcome = gaussian_outcome(problem.truth, *run.result)
    outcome.wall, outcome.cpu = run.wall, run.cpu
    return outcome


def run_gstools(resid, hidden, problem):
    """Per-month ordinary kriging with one pooled exponential variogram (GSTools)."""
    return _timed_outcome(_gstools_predict, problem)


def _pykrige_predict(problem):
    from pykrige.ok import OrdinaryKriging

    x, y = problem.observed_xy[:, 0], problem.observed_xy[:, 1]
    tx, ty = problem.target_xy[:, 0], problem.target_xy[:, 1]
    mean, variance = [], []
    for month in problem.test_observed:
        # PyKrige's own workflow: the variogram is fitted on the month being kriged
        krig = OrdinaryKriging(x, y, month, variogram_model="exponential", coordinates_type="euclidean")
        field, krige_var = krig.execute("points", tx, ty)
        mean.append(np.asarray(field))
        variance.append(np.asarray(krige_var))
    return np.asarray(mean), np.asarray(variance)


def run_pykrige(resid, hidden, problem):
    """Per-month ordinary kriging, variogram fitted per month by PyKrige."""
    return _timed_outcome(_pykrige_predict, problem)


def idw_weights(source_xy, target_xy, power=IDW_POWER):
    """Row-normalised inverse-distance weights, shape (targets, sources)."""
    distance = np.sqrt(((target_xy[:, None, :] - source_xy[None]) ** 2).sum(-1))
    weights = 1.0 / np.maximum(distance, 1e-9) ** power
    return weights / weights.sum(axis=1, keepdims=True)


def _idw_predict(problem):
    weights = idw_weights(problem.observed_xy, problem.target_xy)
    # leave-one-out: each observed cell from the others (zero self-weight, renormalised)
    distance = np.sqrt(((problem.observed_xy[:, None, :] - problem.observed_xy[None]) ** 2).sum(-1))
    np.fill_diagonal(distance, np.inf)
    loo = 1.0 / distance**IDW_POWER
    loo /= loo.sum(axis=1, keepdims=True)
    mean = problem.test_observed @ weights.T
    loo_error = problem.test_observed - problem.test_observed @ loo.T
    variance = np.repeat(np.mean(loo_error**2, axis=1, keepdims=True), weights.shape[0], axis=1)
    return mean, variance


def run_idw(resid, hidden, problem):
    """Inverse-distance weighting per month; variance from leave-one-out errors."""
    run = timed(_idw_predict, problem)
    outcome = gaussian_outcome(problem.truth, *run.result)
    outcome.wall, outcome.cpu = run.wall, run.cpu
    return outcome


def contenders(args):
    """Name -> runner(resid, hidden, problem) of every contender asked for."""
    runners = {"first stage alone": run_first_stage}
    if not args.no_gstools:
        runners[CPU_PEER] = run_gstools
    if not args.no_pykrige:
        runners["ordinary kriging, PyKrige"] = run_pykrige
    runners["inverse-distance weighting"] = run_idw
    runners["adapter, paper model"] = lambda r, h, p: run_adapter(r, h, p, PAPER_MODEL)
    runners[OURS] = lambda r, h, p: run_adapter(r, h, p, {})
    if not args.no_auto:
        runners["adapter, rank='auto'"] = lambda r, h, p: run_adapter(r, h, p, {"rank": "auto"})
    return runners


def summarise(outcomes):
    """Skill pooled over seeds (mean of per-seed scores) and median costs."""
    per_seed = [{
        "rmse": metrics.rmse(o.truth, o.mean), "mae": metrics.mae(o.truth, o.mean),
        "crps": metrics.crps_gaussian(o.truth, o.mean, o.variance),
        "cover": metrics.coverage(o.truth, o.lower, o.upper), "width": metrics.interval_width(o.lower, o.upper),
    } for o in outcomes]
    summary = {key: float(np.mean([s[key] for s in per_seed])) for key in per_seed[0]}
    summary.update(wall=float(np.median([o.wall for o in outcomes])), cpu=float(np.median([o.cpu for o in outcomes])),
                   rank=float(np.mean([o.rank for o in outcomes])))
    return summary


def skill_table(summary):
    header = ["contender", "RMSE (DU)", "MAE (DU)", "CRPS", "90 % coverage", "width (DU)", "rank",
              "wall (s)", "CPU (s)", f"CPU vs {CPU_PEER.split(', ')[-1]}"]
    peer_cpu = summary.get(CPU_PEER, {}).get("cpu")
    rows = [[name, fmt(s["rmse"]), fmt(s["mae"]), fmt(s["crps"]), f"{s['cover']:.3f}", fmt(s["width"]),
             fmt(s["rank"], 2), fmt(s["wall"]), fmt(s["cpu"]), ratio(s["cpu"], peer_cpu) if s["cpu"] > 0 else "–"]
            for name, s in summary.items()]
    return markdown_table(header, rows)


def target_table(summary):
    """The targets of the defaults, each met or missed."""
    ours = summary[OURS]
    others = {name: s for name, s in summary.items() if name != OURS}
    rows = []
    for name, s in others.items():
        change = ours["crps"] / s["crps"] - 1
        rows.append([f"CRPS >= 5 % below {name}", f"{100 * change:+.1f} %", verdict(change <= -0.05)])
    for name, s in others.items():
        change = ours["rmse"] / s["rmse"] - 1
        rows.append([f"RMSE no worse than {name}", f"{100 * change:+.1f} %", verdict(change <= 0)])
    rows.append(["90 % coverage within 0.90 +- 0.03", f"{ours['cover']:.3f}", verdict(abs(ours["cover"] - 0.9) <= 0.03)])
    if CPU_PEER in summary:
        speedup = summary[CPU_PEER]["cpu"] / ours["cpu"]
        rows.append([f"CPU time >= 10x below {CPU_PEER}", f"{speedup:.1f}x less", verdict(speedup >= 10)])
    return markdown_table(["target (adapter, defaults)", "measured", "verdict"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="splits of the cells (default 5)")
    parser.add_argument("--no-gstools", action="store_true", help="skip GSTools ordinary kriging")
    parser.add_argument("--no-pykrige", action="store_true", help="skip PyKrige ordinary kriging")
    parser.add_argument("--no-auto", action="store_true", help="skip the rank='auto' adapter (the slowest)")
    parser.add_argument("--smoke", action="store_true",
                        help="one seed, two test months, no rank='auto': a check that it runs")
    args = parser.parse_args(argv)
    resid = datasets.ozone_residuals(n_train=N_TRAIN)["residual"]
    if args.smoke:
        args.seeds, args.no_auto = 1, True
        resid = resid.isel(time=slice(0, N_TRAIN + SMOKE_TEST_MONTHS))
    runners = contenders(args)
    outcomes = {name: [] for name in runners}
    for seed in range(args.seeds):
        hidden = split(resid, seed)
        problem = Problem(resid, hidden)
        for name, run in runners.items():
            outcomes[name].append(run(resid, hidden, problem))
    summary = {name: summarise(rows) for name, rows in outcomes.items()}
    print(machine_line())
    print(f"\nozone hold-out: {HOLDOUT:.0%} of {resid.sizes['lat'] * resid.sizes['lon']} cells, "
          f"months {N_TRAIN + 1}-{resid.sizes['time']}, {args.seeds} seed(s); skill: mean over seeds, "
          "time: median over seeds (fit + predict)\n")
    print(skill_table(summary))
    if OURS in summary:
        print()
        print(target_table(summary))
    return summary


if __name__ == "__main__":
    main()
