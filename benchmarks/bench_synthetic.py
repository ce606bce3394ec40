"""The paper's 1-D synthetic benchmark over seeds: first stage alone against the adapter.

Generator (the original paper's, as in ``tests/test_admm.py``): ``N = 100`` sites on
``[-5, 5]``; one true pattern ``phi(s) = exp(-s^2)`` (unit norm) with AR(1) scores
(coefficient 0.8, stationary variance 10); five site-and-time covariates with
coefficients ``(10, -9.5, 2.6, -1.3, 1.2)``; unit white noise; ``T = 1000`` times, the
first 800 for training. The frozen first stage is misspecified: OLS on the first three
covariates only, fitted on the training times. The adapter is fitted on the training
residuals with the five covariates as its residual trend (true rank 1).

Test: on the 200 test times, every other site is hidden and kriged from the others
(the adapter's own kriging, at fitted sites, trend included); the first stage alone
predicts the hidden sites by itself. The sites are 1-D (a planar coordinate in km),
which the labelled face does not take (it wants lat/lon or x/y), so the script calls
the engine's seam, :func:`xadapter.engine.pipeline.fit` and ``krige``, directly.

Reported per contender, mean (and spread) over ``--seeds`` seeds: basis recovery
``|cos|`` between the leading basis column and ``phi``, RMSE at the hidden sites on
test times against the observations and against the noise-free values, effective
rank found (true: 1), fit time (wall and CPU, median over seeds).

Contenders: the first stage alone; the paper's model (``gamma=0``, white noise, no
cross-validation over sites) with the nominal rank 1 (the truth) and 10; the
defaults (nominal rank 10, noise-calibrated rank, fine scale, cross-validation over
sites).

Run by hand::

    python benchmarks/bench_synthetic.py [--seeds 10]
    python benchmarks/bench_synthetic.py --smoke        # 1 seed, T = 200
"""

from __future__ import annotations

import argparse

import numpy as np

from xadapter import metrics

from _common import fmt, machine_line, markdown_table, timed

N_SITES = 100
N_TIMES, N_TRAIN = 1000, 800
BETA = np.array([10.0, -9.5, 2.6, -1.3, 1.2])
SCORE_VARIANCE, AR_COEFFICIENT = 10.0, 0.8
#: Planar coordinate of the sites: 1 unit of s = 100 km.
KM_PER_UNIT = 100.0

PAPER_MODEL = {"gamma": 0.0, "fine_scale": None, "site_folds": None}
CONTENDERS = {
    "adapter, paper model, K = 1": {**PAPER_MODEL, "rank": 1},
    "adapter, paper model, K = 10": {**PAPER_MODEL, "rank": 10},
    "adapter, defaults (K = 10)": {},
}


def paper_data(seed, n_times=N_TIMES, n_train=N_TRAIN):
    """The paper's 1-D benchmark: observations, first stage, covariates, truth."""
    rng = np.random.default_rng(seed)
    s = np.linspace(-5.0, 5.0, N_SITES)
    phi = np.exp(-(s**2))
    phi /= np.linalg.norm(phi)
    scores = np.empty(n_times)
    scores[0] = rng.normal(0.0, np.sqrt(SCORE_VARIANCE))
    innovation_sd = np.sqrt(SCORE_VARIANCE * (1.0 - AR_COEFFICIENT**2))
    for t in range(1, n_times):
        scores[t] = AR_COEFFICIENT * scores[t - 1] + rng.normal(0.0, innovation_sd)
    covariates = rng.standard_normal((n_times, N_SITES, BETA.size))
    signal = covariates @ BETA + np.outer(scores, phi)
    y = signal + rng.standard_normal((n_times, N_SITES))
    train = slice(0, n_train)
    # frozen, misspecified first stage: OLS on the first three covariates, training times
    coef = np.linalg.lstsq(covariates[train, :, :3].reshape(-1, 3), y[train].ravel(), rcond=None)[0]
    return {"s": s, "phi": phi, "y": y, "signal": signal, "first_stage": covariates[..., :3] @ coef,
            "covariates": covariates, "n_train": n_train}


def hidden_sites():
    """Every other site, hidden on the test times."""
    return np.arange(N_SITES) % 2 == 1


def score(data, prediction):
    """RMSE at the hidden sites on test times: against observations and noise-free values."""
    test = slice(data["n_train"], None)
    hidden = hidden_sites()
    return {"rmse": metrics.rmse(data["y"][test][:, hidden], prediction[:, hidden]),
            "rmse_signal": metrics.rmse(data["signal"][test][:, hidden], prediction[:, hidden])}


def sites_of(data):
    """The 1-D sites as planar coordinates in km (one column)."""
    from xadapter.engine.sites import Sites

    return Sites(geographic=False, xy_km=(data["s"] * KM_PER_UNIT)[:, None])


def fit_and_predict(data, settings):
    """Fit on the training residuals, krige the hidden sites on the test times."""
    from xadapter.engine import pipeline
    from xadapter.engine.settings import Settings

    train, test = slice(0, data["n_train"]), slice(data["n_train"], None)
    residual = data["y"] - data["first_stage"]
    model = pipeline.fit(residual[train], sites_of(data), Settings(progress=False, **settings),
                         covariates=data["covariates"][train])
    observed = np.where(hidden_sites()[None, :], np.nan, residual[test])
    kriged = pipeline.krige(model, observed, covariates=data["covariates"][test])
    return model, data["first_stage"][test] + np.asarray(kriged.mean)


def run_adapter(data, settings):
    run = timed(fit_and_predict, data, settings)
    model, prediction = run.result
    leading = model.basis[:, 0]
    out = score(data, prediction)
    out.update(cos=float(abs(leading @ data["phi"]) / np.linalg.norm(leading)),
               rank=int(np.sum(np.asarray(model.eigenvalues) > 0)), wall=run.wall, cpu=run.cpu)
    return out


def run_first_stage(data):
    out = score(data, data["first_stage"][data["n_train"]:])
    out.update(cos=np.nan, rank=np.nan, wall=np.nan, cpu=np.nan)
    return out


def summary_table(rows):
    header = ["contender", "\\|cos\\| to true pattern", "RMSE vs observed", "RMSE vs noise-free", "effective rank (true 1)",
              "fit + krige wall (s)", "CPU (s)", "RMSE / first stage"]
    first = np.mean([r["rmse"] for r in rows["first stage alone"]])
    table = []
    for name, runs in rows.items():
        def mean_sd(key, digits=3):
            values = np.array([r[key] for r in runs], dtype=float)
            if np.isnan(values).all():
                return "–"
            return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"

        ranks = np.array([r["rank"] for r in runs], dtype=float)
        rank_text = "–" if np.isnan(ranks).all() else f"{np.mean(ranks):.1f} (range {ranks.min():.0f}-{ranks.max():.0f})"
        rmse = np.mean([r["rmse"] for r in runs])
        table.append([name, mean_sd("cos", 4), mean_sd("rmse"), mean_sd("rmse_signal"), rank_text,
                      fmt(float(np.median([r["wall"] for r in runs]))), fmt(float(np.median([r["cpu"] for r in runs]))),
                      f"{rmse / first:.3f}"])
    return markdown_table(header, table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds of the generator (default 10)")
    parser.add_argument("--smoke", action="store_true", help="one seed, T = 200 (160 training): a check that it runs")
    args = parser.parse_args(argv)
    n_times, n_train = (200, 160) if args.smoke else (N_TIMES, N_TRAIN)
    seeds = 1 if args.smoke else args.seeds
    rows = {"first stage alone": [], **{name: [] for name in CONTENDERS}}
    for seed in range(seeds):
        data = paper_data(seed, n_times, n_train)
        rows["first stage alone"].append(run_first_stage(data))
        for name, settings in CONTENDERS.items():
            rows[name].append(run_adapter(data, settings))
    print(machine_line())
    print(f"\npaper's 1-D benchmark: N = {N_SITES}, T = {n_times} ({n_train} training), true rank 1, "
          f"{seeds} seed(s); every other site hidden on the test times; mean ± sd over seeds, "
          "times: median\n")
    print(summary_table(rows))
    return rows


if __name__ == "__main__":
    main()
