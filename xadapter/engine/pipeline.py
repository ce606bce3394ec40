"""The engine's one seam: :func:`fit` and :func:`krige` on ``(time, site)`` arrays.

Everything a fit runs is called from here, in this order (DESIGN section 1):

1. the smoothness penalty of the sites (only when ``tau1`` is active);
2. the three-block ADMM (:func:`xadapter.engine.admm.fit_adapter`): basis, scores,
   site mean, residual trend, gaps filled;
3. the low-rank-plus-noise covariance with its spectral rank rule, honest about gaps
   (:func:`fit_covariance`);
4. the fine-scale covariance of the remainder beyond the kept rank
   (:func:`fit_fine_scale_of`);
5. the rank/smoothness search (``rank="auto"``, ``tau1="cv"``), which re-enters steps
   2-4 on time blocks and scores candidates by cross-validation over sites;
6. the cross-validation over sites of the final model (calibration at new sites).

The input is a numpy or dask array of shape ``(T, N)``, chunked along time only
(sites whole in a chunk). Every statistic a step needs is a reduction over time (Gram
or operator products, ``tr(S)``, ``Phi^T S Phi``, lag-1 products) or a computation on
a bounded subsample of times (the variogram, the site cross-validation), so a dask
array is never loaded whole. With gaps or a trend the ADMM keeps per-entry state (the
filled field, Z, U): in a store of time blocks, on disk or on the workers of a
``dask.distributed`` cluster (:mod:`xadapter.engine.store`); the gap refill of the
covariance step works time chunk by time chunk.

:func:`krige` maps the Woodbury/fine-scale kriging over time chunks; on dask input its
outputs are dask arrays chunked like the input.

Nothing here knows xarray: the labelled face (:mod:`xadapter.labelled.model`) turns
labels into these arrays and the :class:`~xadapter.engine.fitted.FittedModel` back
into labels.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from ..exceptions import InputError, warn
from . import chunks
from .admm import fit_adapter
from .covariance import low_rank_plus_noise
from .extend import extend_basis
from .finescale import FineScaleParams, fit_fine_scale, krige_with_fine_scale, median_spacing_km
from .fitted import Calibration, FittedModel
from .draws import normal_draws, position_keys, site_keys
from .kriging import KrigingResult
from .kriging import krige as krige_low_rank
from .penalty import build_penalty
from .progress import progress_enabled
from .trend import as_covariates, evaluate_trend
from .validation import (
    coverage_by_distance,
    cross_validate_sites,
    evenly_spaced_times,
    extend_to_held_out,
    site_folds,
    variance_ratio_at,
)

#: Rounds of refilling the gaps before the spectral rule (see :func:`fit_covariance`).
GAP_REFILL_ROUNDS = 8

#: The fine scale is refitted on lags up to this many first-pass ranges.
FINE_FIT_RANGES = 5.0

#: Time steps (evenly spaced) whose remainders enter the pooled variogram. The
#: variogram pools squared differences over pairs and times; 500 fields of sampled
#: pairs pin it down far below the scatter between bins.
FINE_MAX_TIMES = 500

#: Entries (times x sites) of the subsamples of times read for the variogram and the
#: site cross-validation on large networks (32 MB per array): fewer times on many
#: sites, never fewer than :data:`MIN_SUBSAMPLE_TIMES`.
SUBSAMPLE_MAX_ENTRIES = 4_000_000

#: Fewest times a subsample keeps, however many sites.
MIN_SUBSAMPLE_TIMES = 50

#: Largest nominal rank tried by ``rank="auto"``.
AUTO_MAX_RANK = 20

#: First nominal rank of ``rank="auto"`` (the default rank); the search widens to
#: :data:`AUTO_MAX_RANK` only when it could gain (:meth:`_Run.search`).
AUTO_FIRST_RANK = 10

#: Kept ranks scored past the best one (held-out CRPS) before the rank search stops
#: (:func:`_stop_early`).
SEARCH_PATIENCE = 2

#: Multipliers of the largest eigenvalue of ``Dc^T Dc`` tried by ``tau1="cv"`` (plus 0).
#: The penalty is normalised to a largest eigenvalue of 1 while smooth patterns have
#: roughness far below 1, so the penalty starts to matter only near and above the
#: data's leading eigenvalue.
TAU1_CV_FACTORS = (0.01, 0.1, 1.0, 10.0, 100.0)


#: Up to this many sites a fit or a kriging call runs its BLAS on one thread. Its
#: matrices are then small (Gram matrices of a few hundred sites, K x K solves, batches
#: of 30 x 30 systems): a second BLAS thread spins and synchronises more than it
#: computes. Measured on the ozone hold-out (368 sites, 2 cores): 1.00 -> 0.47 CPU s
#: for fit + krige, the same wall time.
SINGLE_THREAD_MAX_SITES = 2000


def _small_problems_single_threaded(function):
    """Run ``function`` with one BLAS thread when its sites are few.

    The number of sites is read from the first argument: ``data`` ``(T, N)`` of
    :func:`fit`, or the :class:`FittedModel` of :func:`krige`.
    """
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        first = args[0] if args else kwargs.get("data", kwargs.get("model"))
        n_sites = first.n_sites if isinstance(first, FittedModel) else np.shape(first)[1]
        with _blas_threads(1 if n_sites <= SINGLE_THREAD_MAX_SITES else None):
            return function(*args, **kwargs)
    return wrapper


def _blas_threads(limit):
    if limit is None:
        return nullcontext()
    return _blas_controller().limit(limits=limit, user_api="blas")


@functools.cache
def _blas_controller():
    """The BLAS libraries loaded in this process, found once: finding them (a scan of the
    loaded shared libraries) costs about 1 ms, a tenth of a small fit on a station network."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


# ---------------------------------------------------------------------------- fit


def nominal_rank(settings, n_times, n_sites):
    """The nominal rank ``K`` a fit uses: ``settings.rank``, or the cap of ``"auto"``."""
    if settings.rank == "auto":
        return min(AUTO_MAX_RANK, n_sites - 1, n_times - 2)
    return settings.rank


@_small_problems_single_threaded
def fit(data, sites, settings, covariates=None, *, site_names=None):
    """Fit a spatial adapter on residuals ``(T, N)``.

    Parameters
    ----------
    data : ndarray or dask array, shape (T, N)
        Residuals of the first stage, NaN where missing; dask arrays chunked along time.
    sites : Sites
        Coordinates of the ``N`` sites.
    settings : Settings
        Validated parameters.
    covariates : ndarray, optional
        Trend covariates ``(T, N, p)``, ``(T, p)`` or ``(N, p)``.
    site_names : sequence, optional
        Labels of the sites, used in error messages only.

    Returns
    -------
    FittedModel
    """
    data = chunks.as_float_array(data)
    n_times, n_sites = data.shape
    if sites.size != n_sites:
        raise InputError(f"sites has {sites.size} entries but the data have {n_sites} columns (sites).")
    rank = nominal_rank(settings, n_times, n_sites)
    missing = check_data(data, rank, site_names)
    if covariates is not None:
        covariates = as_covariates(covariates, n_times, n_sites)
    omega = smoothness_penalty(sites, settings)
    run = _Run(data, sites, settings, covariates, omega, rank, missing)
    if settings.searching:
        core, covariance, fine, selection = run.search()
    else:
        core = run.fit_core(data, covariates, float(settings.tau1))
        covariance = run.covariance(data, core)
        fine = run.fine_scale(data, core, covariance)
        selection = None
    model = _fitted(core, covariance, fine, sites, settings, selection)
    calibration = run.calibrate(data, core, model)
    return model if calibration is None else model.replace(calibration=calibration)


def auto_nominal_ranks(cap):
    """Nominal ranks ``rank="auto"`` fits in turn, up to ``cap`` (:func:`nominal_rank`)."""
    return sorted({min(AUTO_FIRST_RANK, cap), cap})


def check_data(data, rank, site_names=None):
    """Checks every fit needs, in one pass over the data; returns whether any entry is missing."""
    n_times, n_sites = data.shape
    if n_times < 3:
        # the covariance is learnt from how the field varies over time: one map cannot give it
        raise InputError(
            f"need at least 3 time steps to fit an adapter, got {n_times}: give at least 3 time steps "
            "(a time series per site). To krige a single map, fit the adapter on past residuals and "
            "pass the map, with a time dim of length 1, to adapter.krige(...)."
        )
    if rank >= n_sites:
        raise InputError(f"rank={rank} must be smaller than the number of sites ({n_sites}); lower rank.")
    missing = np.isnan(data)
    any_infinite, empty, any_missing = chunks.compute(np.isinf(data).any(), missing.all(axis=0), missing.any())
    if any_infinite:
        raise InputError("residuals contain infinite values; replace them with NaN (missing) or fix them.")
    empty = np.flatnonzero(empty)
    if empty.size:
        labels = [_plain(site_names[i]) if site_names is not None else int(i) for i in empty[:5]]
        raise InputError(
            f"site(s) {labels} have no observation at any time (all NaN); drop them before fitting "
            f"({empty.size} in all)."
        )
    return bool(any_missing)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def smoothness_penalty(sites, settings):
    """The smoothness penalty ``Omega`` (N, N, sparse or dense) the settings ask for; None when tau1 is 0."""
    if settings.tau1 != "cv" and float(settings.tau1) == 0.0:
        return None
    kind = settings.penalty
    if kind == "auto":
        kind = "tps" if sites.size <= 1000 else "graph"
    if kind == "tps":
        return build_penalty(sites.planar_km(), "tps")
    coords, geographic = sites.graph_coords()
    return build_penalty(coords, "graph", k=settings.neighbors, order=settings.penalty_order,
                         geographic=geographic)


def _fitted(core, covariance, fine, sites, settings, selection=None, eigenvalues=None):
    """The :class:`FittedModel` of one fit (``eigenvalues`` overrides the spectral rule's)."""
    return FittedModel(
        basis=core.basis, scores=chunks.materialise(core.scores), mean=chunks.materialise(core.mean),
        rotation=np.asarray(covariance.rotation),
        eigenvalues=np.asarray(covariance.eigenvalues if eigenvalues is None else eigenvalues, dtype=np.float64),
        sample_eigenvalues=np.asarray(covariance.sample_eigenvalues),
        low_rank_noise_variance=float(covariance.noise_variance), fine=fine, sites=sites,
        trend_coefficients=None if core.trend_coef is None else np.asarray(core.trend_coef),
        n_eff=covariance.n_eff, history=core.history, converged=bool(core.converged), n_iter=int(core.n_iter),
        skipped_loop=bool(core.skipped_loop), selection=selection, fine_neighbors=settings.fine_neighbors,
        extension=settings.extension_options,
    )


class _Run:
    """One fit's fixed inputs, so that the search can re-enter the same steps."""

    def __init__(self, data, sites, settings, covariates, omega, rank, missing=None):
        self.data = data
        self.missing = missing
        self.sites = sites
        self.settings = settings
        self.covariates = covariates
        self.omega = omega
        self.rank = rank

    def report(self, message):
        if progress_enabled(self.settings.progress):
            print(f"xadapter: {message}", file=sys.stderr, flush=True)

    # -- steps 2-4
    def fit_core(self, data, covariates, tau1, init=None):
        s = self.settings
        return fit_adapter(
            data, self.rank, omega=self.omega, tau1=tau1, tau2=s.tau2, covariates=covariates, ridge=s.ridge,
            rho=s.rho, batch_size=s.batch_size, phi_every=s.phi_every, phi_freeze=s.phi_freeze,
            momentum=s.momentum, min_iter=s.min_iter, max_iter=s.max_iter, tol_rel=s.tol, seed=s.seed,
            init=init, progress=s.progress,
            # no gap anywhere means none in any subset of times; otherwise the ADMM looks
            has_gaps=False if self.missing is False else None,
        )

    def covariance(self, data, core):
        return fit_covariance(data, core, self.settings.gamma, self.settings.seed, self.sites)

    def fine_scale(self, data, core, covariance, eigenvalues=None, start=None):
        if self.settings.fine_scale is None:
            return None
        return fit_fine_scale_of(data, core, covariance, self.sites, self.settings.fine_scale,
                                 seed=self.settings.seed, eigenvalues=eigenvalues, start=start)

    def folds(self):
        n_sites = self.data.shape[1]
        return site_folds(n_sites, min(int(self.settings.site_folds), n_sites), seed=self.settings.seed)

    # -- step 5
    def search(self):
        """Choose tau1 and/or the effective rank on held-out sites x held-out times (CRPS).

        Times are split into ``cv_time_blocks`` contiguous blocks; for each block the
        adapter is fitted on the other times and every candidate kriges the block's
        times at held-out sites (cross-validation over sites, with the basis and mean
        re-extended), from the other sites' observations. The chosen setting is
        refitted on all times. Kept ranks are scored in rounds across the blocks
        (rank 0 in every block, then rank 1, ...) and the rounds end once a block's
        held-out CRPS has risen for :data:`SEARCH_PATIENCE` ranks past its best: a
        candidate must be scored in every block to be chosen, so the ranks past that
        stop could not be (block by block, the others scored them anyway: on the ozone
        splits 45 % of the candidates, for the same choices).

        With both ``rank="auto"`` and ``tau1="cv"`` the search is coordinate-wise: every
        rank is scored without smoothing, then each ``tau1 > 0`` at the rank chosen there
        (one candidate a block instead of a rank sweep per ``tau1``). On the ozone splits
        and the daily networks the joint grid chose the same models (test CRPS equal to
        4 digits on 9 of 10 cases, 1.1106 against 1.1108 on the tenth) at 2-3 times the cost:
        the held-out CRPS is flat along ``tau1`` at the ranks the data support.

        ``rank="auto"`` fits the nominal ranks of :func:`auto_nominal_ranks` in turn and
        goes to the next only when the search could still gain from it: no block
        stopped early and a block's spectral rule kept all the nominal components (more
        of them might carry signal). Otherwise the search has
        judged the higher ranks already; a larger nominal rank costs more ADMM
        iterations (on 38 gappy stations: ~250 at rank 20 against ~25 at rank 10) and
        fills gaps from more, noisier components.
        """
        nominal = auto_nominal_ranks(self.rank) if self.settings.rank == "auto" else [self.rank]
        for rank in nominal:
            self.rank = rank
            base, totals, skipped, widen = self._search_at_rank()
            if not widen:
                break
        return self._choose(base, totals, skipped)

    def _search_at_rank(self):
        """Score every candidate at the current nominal rank (:meth:`search`); returns the
        fit on all times, the score totals per candidate, the candidates not scored in
        every block, and whether a larger nominal rank could gain."""
        s, data, covariates = self.settings, self.data, self.covariates
        n_times, n_sites = data.shape
        rank = self.rank
        base = self.fit_core(data, covariates, 0.0)
        if s.tau1 == "cv":
            centred = base.filled - base.mean
            top = chunks.top_singular_value(centred) ** 2
            tau1_grid = [0.0] + [float(f * top) for f in TAU1_CV_FACTORS]
        else:
            tau1_grid = [float(s.tau1)]
        ranks = list(range(0, rank + 1)) if s.rank == "auto" else [None]
        # both searched: tau1 = 0 scores every rank, each tau1 > 0 the rank chosen there
        coordinatewise = s.rank == "auto" and len(tau1_grid) > 1
        blocks = time_blocks(data, s.cv_time_blocks or 1)
        folds = self.folds()
        everything = np.arange(n_sites)
        totals, skipped = {}, set()
        widen = False
        first_fine = None
        for tau1 in tau1_grid:
            candidates = ranks
            if coordinatewise and tau1 != tau1_grid[0]:
                candidates = [_best_candidate(totals, skipped, tau1_grid[0])]
            states = []
            for block in blocks:
                if block is None:
                    train_data, train_covariates = data, covariates
                else:
                    train = np.setdiff1d(np.arange(n_times), block)
                    train_data = data[train]
                    train_covariates = None if covariates is None else covariates.rows(train)
                core = self.fit_core(train_data, train_covariates, tau1, init=base.basis)
                covariance = self.covariance(train_data, core)
                if block is None:
                    target = observed_minus_trend(data, core)
                else:
                    target = chunks.materialise(data[block]) - _trend_rows(covariates, core.trend_coef, block)
                reference = _fitted(core, covariance, None, self.sites, s)
                # the blocks are held at once: only the rows the fine scale and the scores read
                fine_rows = evenly_spaced_times(train_data.shape[0], subsample_size(FINE_MAX_TIMES, n_sites))
                scored_rows = evenly_spaced_times(target.shape[0], subsample_size(s.cv_max_times, n_sites))
                states.append(_BlockSearch(
                    train_rows=chunks.take_rows(train_data, fine_rows),
                    core=dataclasses.replace(core, filled=chunks.take_rows(core.filled, fine_rows)),
                    covariance=covariance, target=chunks.take_rows(target, scored_rows), reference=reference,
                    extensions=[extend_to_held_out(reference, np.setdiff1d(everything, held), held)
                                for held in folds],
                    keeps=_ranks_to_score(candidates, covariance.effective_rank)))
            # kept ranks in rounds across the blocks: a candidate not scored in every block is
            # not a choice, so once one block stops early, ranks past its stop are not scored
            # in the others either (the same choice as block by block, fewer candidates)
            stopped = False
            for position in range(max(len(state.keeps) for state in states)):
                for number, state in enumerate(states):
                    if position >= len(state.keeps):
                        continue
                    keep = state.keeps[position]
                    self.report(f"cross-validation: tau1={tau1:.4g}, rank {keep}, time block "
                                f"{number + 1}/{len(blocks)}")
                    eigenvalues = np.where(np.arange(rank) < keep, state.covariance.eigenvalues, 0.0)
                    # each candidate's fine scale starts from the previous one's in its block; a
                    # block's first (rank 0, or the lowest kept) from the previous block's first
                    state.fine = self.fine_scale(state.train_rows, state.core, state.covariance, eigenvalues,
                                                 start=first_fine if position == 0 else state.fine)
                    if position == 0:
                        first_fine = state.fine
                    model = state.reference.replace(eigenvalues=eigenvalues, fine=state.fine)
                    cv = cross_validate_sites(model, state.target, folds, extensions=state.extensions)
                    state.scored[keep] = (cv.crps, cv.rmse, cv.coverage, float(cv.count.sum()))
                    stopped |= _stop_early(state.scored)
                if stopped:
                    break
            for state in states:
                effective_rank = state.covariance.effective_rank
                if candidates is ranks:
                    widen |= s.rank == "auto" and not stopped and effective_rank >= rank
                for candidate in candidates:
                    keep = _kept_rank(candidate, effective_rank)
                    if keep not in state.scored:
                        skipped.add((tau1, candidate))  # beyond the early stop: not a choice
                        continue
                    crps, rmse, coverage, count = state.scored[keep]
                    total = totals.setdefault((tau1, candidate), np.zeros(5))
                    total += (count * keep, count * crps, count * rmse**2, count * coverage, count)
        return base, totals, skipped, widen

    def _choose(self, base, totals, skipped):
        """The best candidate of :meth:`search`, refitted on all times, and the table of scores."""
        s, data, covariates, rank = self.settings, self.data, self.covariates, self.rank
        totals = {key: total for key, total in totals.items() if key not in skipped}
        # rank column: the candidate, or the mean effective rank over the blocks
        records = np.array([(tau1, t[0] / t[4] if candidate is None else candidate, t[1] / t[4],
                             np.sqrt(t[2] / t[4]), t[3] / t[4]) for (tau1, candidate), t in totals.items()])
        best_tau1, best_rank = records[np.argmin(records[:, 2]), :2]
        core = base if best_tau1 == 0.0 else self.fit_core(data, covariates, best_tau1, init=base.basis)
        covariance = self.covariance(data, core)
        if s.rank == "auto":
            keep = min(int(best_rank), covariance.effective_rank)
            covariance = covariance.with_eigenvalues(np.where(np.arange(rank) < keep, covariance.eigenvalues, 0.0))
        fine = self.fine_scale(data, core, covariance)
        return core, covariance, fine, records

    # -- step 6
    def calibrate(self, data, core, model):
        """Site cross-validation of the final model: variance ratios and coverage by distance."""
        folds_wanted = self.settings.site_folds
        if not folds_wanted or data.shape[1] < 2 * int(folds_wanted):
            return None
        folds = self.folds()
        times = evenly_spaced_times(data.shape[0], subsample_size(self.settings.cv_max_times, data.shape[1]))
        self.report(f"site cross-validation of the fitted model ({len(folds)} folds)")
        target = observed_minus_trend(data, core, times)
        cv = cross_validate_sites(model, target, folds, progress=self.settings.progress)
        ratios = variance_ratio_at(model.planar, model.planar, cv.squared_error, cv.model_variance, cv.count)
        return Calibration(
            squared_error=cv.squared_error, model_variance=cv.model_variance, count=cv.count,
            distance_km=cv.distance_km, by_distance=coverage_by_distance(cv, ratios),
            crps=float(cv.crps), rmse=float(cv.rmse), coverage=float(cv.coverage),
        )


@dataclass
class _BlockSearch:
    """One time block of the search: the fit on the other times and its candidates' scores."""

    train_rows: np.ndarray  # the training times the fine scale reads (FINE_MAX_TIMES at most)
    core: object  # the fit on the training times, ``filled`` at those rows only
    covariance: object
    target: np.ndarray  # the block's times that are scored (``cv_max_times`` at most)
    reference: FittedModel
    extensions: list
    keeps: list  # kept ranks to score, ascending
    scored: dict = field(default_factory=dict)  # kept rank -> (crps, rmse, coverage, count)
    fine: object = None


def _best_candidate(totals, skipped, tau1):
    """The candidate rank with the lowest mean CRPS at ``tau1`` among those scored in every block."""
    scored = {candidate: total[1] / total[4] for (value, candidate), total in totals.items()
              if value == tau1 and (value, candidate) not in skipped}
    return min(scored, key=lambda candidate: (scored[candidate], candidate))


def _kept_rank(candidate, effective_rank):
    """Components a candidate rank keeps (None: the spectral rule's)."""
    return effective_rank if candidate is None else min(candidate, effective_rank)


def _ranks_to_score(ranks, effective_rank):
    """Distinct kept ranks of the candidates, ascending: candidates above the effective
    rank keep the same components and share one score."""
    return sorted({_kept_rank(candidate, effective_rank) for candidate in ranks})


def _stop_early(scored, patience=None):
    """Whether the last ``patience`` kept ranks all scored worse (CRPS) than an earlier one.

    The held-out CRPS against the rank falls while components carry signal and rises
    once they carry noise; candidates past a clear minimum are not scored. Those not
    scored in every time block are not chosen.
    """
    patience = SEARCH_PATIENCE if patience is None else patience
    crps = [value[0] for value in scored.values()]
    if len(crps) <= patience:
        return False
    return min(crps[-patience:]) > min(crps[:-patience])


def fit_covariance(data, core, gamma, seed, sites=None):
    """Low-rank-plus-noise covariance of a fit, honest about the gaps.

    Gaps are filled from the rank-K reconstruction, which carries no noise and
    reinforces the K fitted directions: the spectral rule then reads noise
    components as signal (measured: true rank 3 read as 10 with 10 % of entries
    missing). With gaps, the gaps are refilled with a draw from the kriging
    predictive distribution of the current covariance (shrunken scores plus noise,
    seeded) and the covariance re-estimated, until the effective rank settles.
    """
    covariance = low_rank_plus_noise(core.basis, core.filled, gamma=gamma)
    (any_missing,) = chunks.compute(np.isnan(data).any())
    if not any_missing:
        return covariance
    keys = site_keys(sites, seed) if sites is not None else position_keys(data.shape[1], seed)
    for _ in range(GAP_REFILL_ROUNDS):
        if covariance.effective_rank == 0:
            break
        model = (covariance.loadings(core.basis), covariance.eigenvalues, covariance.noise_variance, core.mean, keys)
        if chunks.is_lazy(data) or chunks.is_lazy(core.filled):
            import dask.array as da

            # time by time, so chunk by chunk: the draws depend on the time index, not the chunking
            refilled = da.map_blocks(_refill_block, data, core.filled, *model, dtype=np.float64)
        else:
            refilled = _refill_block(data, core.filled, *model)
        updated = low_rank_plus_noise(core.basis, refilled, gamma=gamma)
        settled = updated.effective_rank == covariance.effective_rank
        covariance = updated
        if settled:
            break
    return covariance


def _refill_block(data, filled, loadings, eigenvalues, noise_variance, mean, keys, block_info=None):
    """The gaps of a block of times refilled with draws from the kriging predictive distribution.

    The draws are keyed by where each site is (:mod:`xadapter.engine.draws`): keyed by
    position, a permutation of the sites would hand other draws to the gaps and move
    the refilled covariance.
    """
    start = 0 if block_info is None else block_info[0]["array-location"][0][0]
    missing = np.isnan(data)
    result = krige_low_rank(np.where(missing, np.nan, filled), loadings, eigenvalues, noise_variance, mean=mean)
    draws = normal_draws(keys, start, start + data.shape[0])
    return np.where(missing, result.mean + np.sqrt(result.variance) * draws, filled)


def fit_fine_scale_of(data, core, covariance, sites, kind, *, seed=0, eigenvalues=None, start=None):
    """Fit the fine-scale covariance on the remainders beyond the kept low rank.

    The remainders of at most :data:`FINE_MAX_TIMES` evenly spaced times enter the
    pooled variogram. ``start``: a neighbouring candidate's fit (the rank search), from
    which one pass with lags set by its range is warm-started.
    """
    eigenvalues = covariance.eigenvalues if eigenvalues is None else eigenvalues
    loadings = covariance.loadings(core.basis)[:, np.asarray(eigenvalues) > 0]
    times = evenly_spaced_times(data.shape[0], subsample_size(FINE_MAX_TIMES, data.shape[1]))
    centred = chunks.take_rows(core.filled, times) - core.mean
    remainders = centred - (centred @ loadings) @ loadings.T
    remainders[np.isnan(chunks.take_rows(data, times))] = np.nan
    coords, geographic = sites.graph_coords()
    if not np.nanmax(np.abs(remainders), initial=0.0) > 0:
        # nothing beyond the low rank (a constant or exactly low-rank field): no fine scale,
        # the spectral rule's noise floor as the nugget; the range is not identified
        return FineScaleParams(kind, 0.0, median_spacing_km(coords, geographic, sites.size),
                               float(covariance.noise_variance))
    def fit(**options):
        return fit_fine_scale(remainders, coords, kind, geographic=geographic, seed=seed, **options)

    if start is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a candidate's fit: the chosen model is refitted in full
            try:
                return fit(max_distance=_lag_limit(start), start=start)
            except InputError:
                pass
    # the first pass only sets the lags of the second, so the variogram alone does (the local
    # likelihood, two thirds of the cost, is run once, on the pass that is kept); its
    # warnings do not stand
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = fit(split="variogram")
    limit = _lag_limit(first)
    if limit is not None:
        try:
            return fit(max_distance=limit)
        except InputError:
            pass
    # spatially white remainders, or no second pass possible: the one pass, in full
    return fit()


def _lag_limit(params):
    """Largest lag of a fine-scale refit after ``params``: a few ranges, or None (all lags).

    The kept low rank takes the long-wave part of the fine-scale field and lowers the
    remainders' plateau; fitting lags up to a few ranges keeps that out of ell and tau^2.
    Spatially white remainders (a partial sill under 5 % of the sill) have no range to go by.
    """
    return FINE_FIT_RANGES * params.range_km if params.partial_sill > 0.05 * params.sill else None


def subsample_size(max_times, n_sites):
    """Times to read for a subsample: at most ``max_times``, fewer on large networks."""
    if max_times is None and n_sites * MIN_SUBSAMPLE_TIMES >= SUBSAMPLE_MAX_ENTRIES:
        return MIN_SUBSAMPLE_TIMES
    cap = max(MIN_SUBSAMPLE_TIMES, SUBSAMPLE_MAX_ENTRIES // max(n_sites, 1))
    return cap if max_times is None else min(max_times, cap)


def observed_minus_trend(data, core, times=None):
    """The residual minus trend at the observed entries, NaN at the gaps (numpy rows)."""
    observed = chunks.take_rows(data, times)
    return np.where(np.isnan(observed), np.nan, chunks.take_rows(core.filled, times))


def time_blocks(data, n_blocks):
    """Contiguous time blocks whose complement observes every site ([None]: no split)."""
    n_times = data.shape[0]
    if n_blocks < 2 or n_times < 3 * n_blocks:
        return [None]
    blocks = np.array_split(np.arange(n_times), n_blocks)
    observed = ~np.isnan(data)
    seen = chunks.compute(*[observed[block].any(axis=0) for block in blocks])
    everywhere = np.array(seen)
    for number in range(n_blocks):
        rest = np.delete(everywhere, number, axis=0)
        if not rest.any(axis=0).all():
            return [None]  # some site is seen only inside one block
    return blocks


def _trend_rows(covariates, theta, rows):
    """Residual trend at some times, zero without covariates."""
    if covariates is None or theta is None:
        return 0.0
    return covariates.rows(rows).evaluate(theta)


# ---------------------------------------------------------------------------- krige


@_small_problems_single_threaded
def krige(model, observed, *, targets=None, covariates=None, target_covariates=None, level=0.9,
          include_noise=True, multiplier=None):
    """Krige residual fields with a fitted model.

    Parameters
    ----------
    model : FittedModel
    observed : ndarray or dask array, shape (T, N)
        Residuals at the fitted sites (columns in the fitted order), NaN where
        unobserved. Dask input gives dask outputs chunked like it along time.
    targets : Sites, optional
        New locations; default the fitted sites (filling their gaps).
    covariates, target_covariates : ndarray, optional
        Trend covariates at the observed times and the fitted sites, and at the same
        times and the targets (``(T, N, p)``, ``(T, p)`` or ``(N, p)``), when the model
        has a trend.
    level : float
        Central probability of the intervals.
    include_noise : bool
        Predict a new observation (adds the white noise) rather than the latent field.
    multiplier : float, optional
        Interval half-width in standard deviations (default Gaussian at ``level``).

    Returns
    -------
    KrigingResult
        ``mean``, ``variance``, ``lower``, ``upper`` (T, P), numpy or dask.
    """
    observed = chunks.as_float_array(observed)
    n_times, n_sites = observed.shape
    if n_sites != model.n_sites:
        raise InputError(f"observed has {n_sites} sites (columns) but the adapter was fitted on {model.n_sites}.")
    trend_observed = trend_target = None
    if model.trend_coefficients is not None:
        if covariates is None:
            raise InputError("the adapter has a residual trend: pass covariates covering the observed "
                             "times and every observed and target site.")
        trend_observed = evaluate_trend(covariates, model.trend_coefficients, n_times, n_sites)
        trend_target = trend_observed if targets is None else evaluate_trend(
            target_covariates, model.trend_coefficients, n_times, targets.size)
    plan = _KrigingPlan(model, targets, include_noise)
    kernel = plan.kernel
    if not chunks.is_lazy(observed):
        data = observed if trend_observed is None else observed - trend_observed
        mean, variance = kernel(data)
    else:
        data = observed if trend_observed is None else observed - chunks.like(trend_observed, observed)
        mean, variance = chunks.map_time_blocks(kernel, data, plan.n_targets)
    if trend_target is not None:
        mean = mean + (chunks.like(trend_target, mean) if chunks.is_lazy(mean) else trend_target)
    return KrigingResult.from_moments(mean, variance, level, multiplier)


class _KrigingPlan:
    """Everything about the targets that does not depend on the observed times.

    The extension of the basis and mean, and the variance ratios at new sites, are
    computed once; :meth:`kernel` then kriges any block of times.
    """

    def __init__(self, model, targets, include_noise):
        self.model = model
        self.include_noise = include_noise
        self.loadings = model.loadings
        self.ratio = None
        if targets is None:
            self.target_loadings = self.target_mean = self.target_coords = None
            self.n_targets = model.n_sites
            return
        if targets.geographic != model.geographic:
            raise InputError(
                "`at` and the fitted sites use different coordinate systems (lat/lon vs x/y); "
                "give target locations in the fitted system."
            )
        target_planar = model.target_planar(targets)
        values = np.column_stack([model.basis, model.mean])
        extended = extend_basis(target_planar, model.planar, values, **model.extension)
        self.target_loadings = extended[:, :-1] @ model.rotation
        self.target_mean = extended[:, -1]
        self.target_coords = targets.graph_coords()[0]
        self.n_targets = targets.size
        calibration = model.calibration
        if calibration is not None:
            self.ratio = variance_ratio_at(target_planar, model.planar, calibration.squared_error,
                                           calibration.model_variance, calibration.count)

    def kernel(self, data):
        """Kriged mean and variance ``(t, P)`` of a block of times ``(t, N)`` (numpy)."""
        model = self.model
        if model.fine is None:
            result = krige_low_rank(data, self.loadings, model.eigenvalues, model.noise_variance,
                                    target_loadings=self.target_loadings, mean=model.mean,
                                    target_mean=self.target_mean, include_noise=self.include_noise)
            mean, variance = result.mean, result.variance
        else:
            mean, variance = krige_with_fine_scale(
                data, self.loadings, model.eigenvalues, model.fine, model.graph_coords,
                target_loadings=self.target_loadings, target_coords=self.target_coords,
                mean=model.mean, target_mean=self.target_mean, include_noise=self.include_noise,
                k=model.fine_neighbors, geographic=model.geographic,
            )
        if self.ratio is not None:
            variance = variance * self.ratio[None, :]
        return mean, variance
