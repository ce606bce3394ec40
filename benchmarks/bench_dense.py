"""The adapter against the textbook dense computation of the same fit and kriging.

The textbook way (written here as a plain numpy/scipy reference, :class:`DenseReference`;
it forms N x N matrices, which the library never does on large networks):

* the thin-plate penalty by a dense inverse of the ``(N + 3)`` thin-plate system,
  ``Omega = Lp^T K Lp`` (SpatPCA's construction), normalised to unit largest
  eigenvalue by a dense eigendecomposition;
* the three-block ADMM of DESIGN section 1 with all times in every iteration (the
  same updates and stopping rule as :func:`xadapter.engine.admm.fit_adapter`), whose
  Phi-step forms ``A = Wc^T Wc - tau1 Omega`` (N x N) and takes a full dense ``eigh``
  of it at every iteration;
* the covariance from the dense ``S = Wc^T Wc / T`` with the paper's rule
  (``gamma = 0``);
* kriging by a dense Cholesky solve with ``Sigma_OO`` (|O| x |O|) for every time.

Ours: :func:`xadapter.engine.pipeline.fit` and :func:`~xadapter.engine.pipeline.krige`
with ``rank=10``, the same ``tau1``, ``gamma=0``, ``fine_scale=None``,
``site_folds=None`` (the paper's model) and the default penalty choice: thin-plate
(``penalty="tps"``) up to 4000 sites, where the problem is the same as the
reference's, and the sparse graph Laplacian above, where it is not (the thin-plate
penalty is refused there), so agreement is reported only where the problems match.

Data: ``N`` sites uniform in a 1000 km square, ``T`` training times plus
``KRIGE_TIMES`` test times; four smooth Gaussian-bump patterns with AR(1) scores,
a residual trend on two site-and-time covariates (the first stage missed it) and
unit white noise; 20 % of the sites unobserved at each test time (a different
random set each time), kriged from the others.

Each side runs in a fresh Python process (so its peak resident memory, read from
``/proc/self/status``, is its own); reported: fit and kriging wall and CPU time
(``time.process_time``, all threads), peak memory, their ratios (reference / ours),
the number of ADMM iterations, and the agreement: subspace distance of the bases,
relative differences of the eigenvalues, noise variance and trend, and of the kriged
means and variances.

Target (issue 10): at least 20x faster at N = 2000 with the same answers (subspace
distance below 1e-6).

Run by hand::

    python benchmarks/bench_dense.py                      # N = 500, 2000; T = 1000
    python benchmarks/bench_dense.py --sizes 500,2000,5000 # the N = 5000 reference takes long
    python benchmarks/bench_dense.py --blas-threads 1      # steadier CPU times on a busy machine
    python benchmarks/bench_dense.py --smoke              # N = 120, T = 100, in process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import scipy.linalg as sla
from scipy.spatial.distance import cdist

from _common import fmt, machine_line, markdown_table, peak_memory_mib, timed, verdict

RANK = 10
KRIGE_TIMES = 20
HIDDEN_SHARE = 0.2
DOMAIN_KM = 1000.0
PATTERN_SCALE_KM = 200.0
SCORE_SPREAD = np.array([1.0, 0.7, 0.5, 0.35])
AR_COEFFICIENT = 0.8
TREND = np.array([1.5, -0.8])
#: tau1 as a fraction of the leading eigenvalue scale ``T * max score variance``.
TAU1_FRACTION = 1e-3
#: Largest N for which ours uses the thin-plate penalty (above it the graph Laplacian).
TPS_MAX_SITES = 4000
#: ADMM settings shared by both sides (the library's defaults).
RHO, MIN_ITER, MAX_ITER, TOL_ABS, TOL_REL, RIDGE = 1.0, 5, 200, 1e-6, 1e-4, 1e-6
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


# ----------------------------------------------------------------------------- data


def make_problem(n_sites, n_times, seed=0):
    """Sites (km), training residuals, covariates, and the test times with gaps."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.0, DOMAIN_KM, (n_sites, 2))
    centres = rng.uniform(0.2 * DOMAIN_KM, 0.8 * DOMAIN_KM, (SCORE_SPREAD.size, 2))
    patterns = np.exp(-cdist(xy, centres, "sqeuclidean") / (2 * PATTERN_SCALE_KM**2))
    patterns /= np.linalg.norm(patterns, axis=0)
    total = n_times + KRIGE_TIMES
    sd = np.sqrt(n_sites) * SCORE_SPREAD
    scores = np.empty((total, SCORE_SPREAD.size))
    scores[0] = rng.standard_normal(SCORE_SPREAD.size) * sd
    for t in range(1, total):
        scores[t] = AR_COEFFICIENT * scores[t - 1] + np.sqrt(1 - AR_COEFFICIENT**2) * sd * rng.standard_normal(sd.size)
    covariates = rng.standard_normal((total, n_sites, TREND.size))
    values = scores @ patterns.T + covariates @ TREND + rng.standard_normal((total, n_sites))
    test = values[n_times:].copy()
    hidden = np.zeros(test.shape, bool)
    n_hidden = int(round(HIDDEN_SHARE * n_sites))
    for row in hidden:
        row[rng.choice(n_sites, n_hidden, replace=False)] = True
    return {"xy": xy, "train": values[:n_times], "covariates": covariates[:n_times],
            "test_covariates": covariates[n_times:], "observed": np.where(hidden, np.nan, test),
            "hidden": hidden, "tau1": TAU1_FRACTION * n_times * float(sd.max() ** 2)}


# ----------------------------------------------------------------------------- reference


class DenseReference:
    """The textbook computation: every N x N matrix formed, dense factorisations."""

    def __init__(self, problem, rank=RANK):
        self.p = problem
        self.rank = rank

    @staticmethod
    def thin_plate_penalty(xy):
        """``Lp^T K Lp`` from the dense inverse of the thin-plate system, unit top eigenvalue."""
        n = xy.shape[0]
        distance = cdist(xy, xy)
        with np.errstate(divide="ignore", invalid="ignore"):
            kernel = np.where(distance > 0, distance**2 * np.log(distance) / (8 * np.pi), 0.0)
        poly = np.hstack([np.ones((n, 1)), xy])
        system = np.block([[kernel, poly], [poly.T, np.zeros((3, 3))]])
        lp = np.linalg.inv(system + 1e-8 * np.eye(n + 3))[:n, :n]
        omega = lp.T @ kernel @ lp
        omega = 0.5 * (omega + omega.T)
        return omega / np.linalg.eigvalsh(omega)[-1]

    def top_eigenvectors(self, w, omega, tau1):
        """Full dense ``eigh`` of ``Wc^T Wc - tau1 Omega``; its top ``rank`` vectors."""
        centred = w - w.mean(axis=0)
        values, vectors = np.linalg.eigh(centred.T @ centred - tau1 * omega)
        return vectors[:, ::-1][:, : self.rank]

    def fit(self):
        """ADMM with the full batch, then the paper's covariance rule."""
        r, x, tau1 = self.p["train"], self.p["covariates"], self.p["tau1"]
        n_times, n_sites = r.shape
        design = x.reshape(-1, x.shape[-1])
        gram = design.T @ design + RIDGE * np.eye(design.shape[1])

        def ridge(target):
            return np.linalg.solve(gram, design.T @ target.ravel())

        omega = self.thin_plate_penalty(self.p["xy"])
        theta = ridge(r)
        z = r - x @ theta
        u = np.zeros_like(z)
        spread = float(np.sqrt(np.mean((z - z.mean(axis=0)) ** 2)))
        basis = self.top_eigenvectors(z, omega, tau1)
        basis_tol = TOL_ABS + TOL_REL * np.sqrt(self.rank)
        iteration = 0
        for iteration in range(1, MAX_ITER + 1):
            theta = ridge(r - z - u)
            target = r - x @ theta
            q = target - u
            mean = q.mean(axis=0)
            centred = q - mean
            z_new = mean + RHO / (RHO + 2) * centred + 2 / (RHO + 2) * (centred @ basis) @ basis.T
            increment = z_new - target
            primal, dual = np.linalg.norm(increment), RHO * np.linalg.norm(z_new - z)
            w_mean = target.mean(axis=0)
            data_norm = np.linalg.norm(target - w_mean)
            u += increment
            z = z_new
            new = self.top_eigenvectors(target, omega, tau1)
            change = np.linalg.norm(new @ new.T - basis @ basis.T)  # textbook: N x N projectors
            basis = new
            eps = TOL_ABS * spread * np.sqrt(z.size) + TOL_REL * data_norm
            if iteration >= MIN_ITER and primal <= eps and dual <= RHO * eps and change <= basis_tol:
                break
        w = r - x @ theta
        basis = self.top_eigenvectors(w, omega, tau1)
        site_mean = w.mean(axis=0)
        centred = w - site_mean
        covariance_s = centred.T @ centred / n_times
        small, rotation = np.linalg.eigh(basis.T @ covariance_s @ basis)
        order = np.argsort(small)[::-1]
        sample, rotation = small[order], rotation[:, order]
        noise = self.paper_noise_variance(sample, float(np.trace(covariance_s)), n_sites)
        eigenvalues = np.maximum(sample - noise, 0.0)
        return {"basis": basis, "loadings": basis @ rotation, "eigenvalues": eigenvalues, "noise": noise,
                "theta": theta, "mean": site_mean, "n_iter": iteration}

    @staticmethod
    def paper_noise_variance(sample, trace, n_sites, gamma=0.0):
        """SpatPCA's rule: scan L down from K while ``d_L - gamma < sigma_L^2``."""
        def trailing(rank):
            return (trace - sample[:rank].sum() + rank * gamma) / (n_sites - rank)

        if not sample[0] > gamma:
            return trace / n_sites
        rank = sample.size
        while rank > 1 and sample[rank - 1] - gamma < trailing(rank):
            rank -= 1
        noise = trailing(rank)
        return trace / n_sites if sample[0] - gamma < noise else noise

    def krige(self, fitted):
        """Dense ``Sigma_PO Sigma_OO^{-1} r_O`` per time, and the new-observation variance."""
        loadings, eigenvalues = fitted["loadings"], fitted["eigenvalues"]
        sigma = (loadings * eigenvalues) @ loadings.T + fitted["noise"] * np.eye(loadings.shape[0])
        trend = self.p["test_covariates"] @ fitted["theta"]
        observed = self.p["observed"] - trend - fitted["mean"]
        means, variances = [], []
        for row, hidden in zip(observed, self.p["hidden"]):
            seen = ~hidden
            factor = sla.cho_factor(sigma[np.ix_(seen, seen)])
            cross = sigma[np.ix_(hidden, seen)]
            means.append(cross @ sla.cho_solve(factor, row[seen]))
            variances.append(np.diag(sigma)[hidden] - np.sum(cross * sla.cho_solve(factor, cross.T).T, axis=1))
        hidden_trend = trend[self.p["hidden"]].reshape(len(means), -1)
        hidden_mean = np.broadcast_to(fitted["mean"], trend.shape)[self.p["hidden"]].reshape(len(means), -1)
        return np.asarray(means) + hidden_trend + hidden_mean, np.asarray(variances)


# ----------------------------------------------------------------------------- ours


def fit_ours(problem, rank=RANK):
    """The library's engine, paper's model, thin-plate penalty where allowed."""
    from xadapter.engine import pipeline
    from xadapter.engine.settings import Settings
    from xadapter.engine.sites import Sites

    n_sites = problem["xy"].shape[0]
    settings = Settings(rank=rank, tau1=problem["tau1"], penalty="tps" if n_sites <= TPS_MAX_SITES else "graph",
                        gamma=0.0, fine_scale=None, site_folds=None, progress=False)
    sites = Sites(geographic=False, xy_km=problem["xy"])
    return pipeline.fit(problem["train"], sites, settings, covariates=problem["covariates"])


def krige_ours(problem, model):
    """Kriged means and variances at the hidden sites, shape (times, hidden per time)."""
    from xadapter.engine import pipeline

    result = pipeline.krige(model, problem["observed"], covariates=problem["test_covariates"])
    hidden = problem["hidden"]
    return (np.asarray(result.mean)[hidden].reshape(hidden.shape[0], -1),
            np.asarray(result.variance)[hidden].reshape(hidden.shape[0], -1))


def ours_summary(model):
    """The fitted quantities compared with the reference."""
    return {"basis": model.basis, "eigenvalues": model.eigenvalues, "noise": model.noise_variance,
            "theta": model.trend_coefficients, "n_iter": model.n_iter}


# ----------------------------------------------------------------------------- measuring


def measure_one(side, n_sites, n_times, out):
    """Child process: make the problem, fit and krige once, save numbers and answers."""
    problem = make_problem(n_sites, n_times)
    if side == "ours":
        fit_ours(make_problem(60, 30))  # warm-up: loads every module the fit uses
        fit_memory, fit = peak_memory_mib(timed, fit_ours, problem)
        krige_memory, krige = peak_memory_mib(timed, krige_ours, problem, fit.result)
        summary = ours_summary(fit.result)
    else:
        reference = DenseReference(problem)
        fit_memory, fit = peak_memory_mib(timed, reference.fit)
        krige_memory, krige = peak_memory_mib(timed, reference.krige, fit.result)
        summary = {key: fit.result[key] for key in ("basis", "eigenvalues", "noise", "theta", "n_iter")}
    mean, variance = krige.result
    np.savez(out, mean=mean, variance=variance, **{k: np.asarray(v) for k, v in summary.items()})
    print(json.dumps({"fit_wall": fit.wall, "fit_cpu": fit.cpu, "krige_wall": krige.wall, "krige_cpu": krige.cpu,
                      "fit_memory": fit_memory, "krige_memory": krige_memory}))


def run_in_process(side, n_sites, n_times, workdir, blas_threads=None):
    """:func:`measure_one` in this process (faster; memory peaks less exact)."""
    out = os.path.join(workdir, f"{side}-{n_sites}.npz")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        measure_one(side, n_sites, n_times, out)
    result = json.loads(printed.getvalue().strip().splitlines()[-1])
    with np.load(out) as answers:
        result.update({key: answers[key] for key in answers.files})
    return result


def blas_env(threads):
    """Environment pinning the BLAS thread pools of a child process (None: inherit)."""
    if threads is None:
        return {}
    return {name: str(threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def run_child(side, n_sites, n_times, workdir, blas_threads=None):
    """:func:`measure_one` in a fresh process; its numbers and answers."""
    out = os.path.join(workdir, f"{side}-{n_sites}.npz")
    command = [sys.executable, os.path.abspath(__file__), "--measure-one", side, "--sizes", str(n_sites),
               "--times", str(n_times), "--out", out]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **MEASURE_ENV, **blas_env(blas_threads)},
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode != 0:
        raise RuntimeError(f"{side} at N = {n_sites} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(out) as answers:
        result.update({key: answers[key] for key in answers.files})
    return result


def relative(a, b):
    """Largest relative difference ``max |a - b| / max |b|``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def agreement(ours, reference):
    """Subspace distance of the bases and relative differences of the other answers."""
    from xadapter.engine.basis import subspace_distance

    kept = reference["eigenvalues"] > 0
    return {"distance": subspace_distance(ours["basis"], reference["basis"]),
            "eigenvalues": relative(np.sort(ours["eigenvalues"])[::-1][kept], reference["eigenvalues"][kept]),
            "noise": relative(ours["noise"], reference["noise"]),
            "theta": relative(ours["theta"], reference["theta"]),
            "mean": relative(ours["mean"], reference["mean"]),
            "variance": relative(ours["variance"], reference["variance"])}


def tables(results):
    """Cost, agreement and target tables, one row per N."""
    cost_rows, agree_rows, target_rows = [], [], []
    for n_sites, (ours, reference) in results.items():
        same = n_sites <= TPS_MAX_SITES
        peak_dense = max(reference["fit_memory"], reference["krige_memory"])
        peak_ours = max(ours["fit_memory"], ours["krige_memory"], 1e-9)
        cost_rows.append([
            f"{n_sites}", f"{int(reference['n_iter'])} / {int(ours['n_iter'])}",
            fmt(reference["fit_cpu"]), fmt(ours["fit_cpu"]), f"{reference['fit_cpu'] / ours['fit_cpu']:.1f}x",
            fmt(reference["krige_cpu"]), fmt(ours["krige_cpu"]),
            f"{reference['krige_cpu'] / ours['krige_cpu']:.1f}x",
            fmt(reference["fit_wall"] + reference["krige_wall"]), fmt(ours["fit_wall"] + ours["krige_wall"]),
            fmt(peak_dense), fmt(peak_ours), f"{peak_dense / peak_ours:.1f}x",
        ])
        if same:
            agree = agreement(ours, reference)
            agree_rows.append([f"{n_sites}", f"{agree['distance']:.1e}", f"{agree['eigenvalues']:.1e}",
                               f"{agree['noise']:.1e}", f"{agree['theta']:.1e}", f"{agree['mean']:.1e}",
                               f"{agree['variance']:.1e}"])
        else:
            agree_rows.append([f"{n_sites}", "different penalty (graph)", "–", "–", "–", "–", "–"])
        if n_sites == 2000:
            speedup = (reference["fit_cpu"] + reference["krige_cpu"]) / (ours["fit_cpu"] + ours["krige_cpu"])
            target_rows.append(["fit + krige >= 20x less CPU at N = 2000", f"{speedup:.1f}x", verdict(speedup >= 20)])
            distance = agreement(ours, reference)["distance"]
            target_rows.append(["subspace distance < 1e-6 at N = 2000", f"{distance:.1e}", verdict(distance < 1e-6)])
    cost = markdown_table(["N", "ADMM iterations (dense / ours)", "fit CPU dense (s)", "fit CPU ours (s)",
                           "fit CPU ratio", "krige CPU dense (s)", "krige CPU ours (s)", "krige CPU ratio",
                           "wall dense (s)", "wall ours (s)", "peak memory dense (MiB)", "peak memory ours (MiB)",
                           "memory ratio"], cost_rows)
    agree = markdown_table(["N", "subspace distance", "eigenvalues (rel.)", "noise variance (rel.)",
                            "trend (rel.)", "kriged mean (rel.)", "kriged variance (rel.)"], agree_rows)
    out = [cost, agree]
    if target_rows:
        out.append(markdown_table(["target", "measured", "verdict"], target_rows))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000", help="comma-separated N (default 500,2000)")
    parser.add_argument("--times", type=int, default=1000, help="training time steps T (default 1000)")
    parser.add_argument("--in-process", action="store_true",
                        help="run both sides in this process (faster, memory peaks less exact)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="BLAS threads of both sides' processes (default: inherited); 1 keeps CPU time "
                             "free of idle-spinning threads on a busy machine")
    parser.add_argument("--smoke", action="store_true", help="N = 120, T = 100, in process: a check that it runs")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.measure_one:
        measure_one(args.measure_one, sizes[0], args.times, args.out)
        return None
    if args.smoke:
        sizes, args.times, args.in_process = [120], 100, True
    run = run_in_process if args.in_process else run_child
    print(machine_line())
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for n_sites in sizes:
            results[n_sites] = tuple(run(side, n_sites, args.times, workdir, args.blas_threads)
                                     for side in ("ours", "dense"))
    print(f"\ndense textbook reference vs ours: T = {args.times}, rank {RANK}, tau1 = {TAU1_FRACTION:g} x T x "
          f"max score variance, trend on {TREND.size} covariates, gamma = 0, white noise; kriging "
          f"{KRIGE_TIMES} times with {HIDDEN_SHARE:.0%} of the sites hidden (own pattern each); one run each; "
          f"BLAS threads {args.blas_threads or 'inherited'}\n")
    for table in tables(results):
        print(table)
        print()
    return results


if __name__ == "__main__":
    main()
