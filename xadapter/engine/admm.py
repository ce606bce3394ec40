"""The three-block mini-batch ADMM that fits the spatial adapter (DESIGN section 1).

Objective, over the basis ``Phi`` (N x K, orthonormal) and trend coefficients
``theta``::

    min  || J (R - X theta) (I - P) ||_F^2 + tau1 tr(Phi^T Omega Phi) + tau2 |Phi|_1

with ``P = Phi Phi^T`` and ``J = I - 1 1^T / T`` the centring over time (so the
per-site time mean is not asked to be explained by the basis; it is kept separately as
``mean``). Splitting ``Z = R - X theta`` with the scaled dual ``U``, the augmented
Lagrangian is ``f(Z, Phi) + (rho / 2) ||Z - R + X theta + U||^2 + penalties``, where
``f(Z, Phi) = ||J Z (I - P)||^2``. One iteration on a window ``B`` of times:

1. **theta-step** (closed form, all times): ridge regression of ``R - Z - U`` on the
   covariates, over observed entries only (:class:`xadapter.engine.trend.RidgeTrend`).
2. **Z-step** (rows of ``B``, the other rows fixed): with ``Q = R_B - mu_B - U_B``,
   minimising ``f + (rho/2)||Z_B - Q||^2`` exactly gives::

       Z_B = m_B + rho/(rho+2) (Q - m_B) + 2/(rho+2) (Q - m_B) P

   The plain formula ``rho/(rho+2) Q + 2/(rho+2) Q P`` is the uncentred case; with
   the centring the projection acts on rows centred by ``m_B`` and the mean is added
   back. ``m_B`` is the time mean of the *updated* ``Z`` (in the span of ``I - P``,
   the only part ``f`` sees), which has the closed form::

       m_B = ((2 + rho) S_out + rho sum_{t in B} q_t) / ((2 + rho) T - 2 |B|)

   ``S_out`` the column sum of the rows of ``Z`` outside ``B``. (Setting the gradient
   ``2 (I-P)(z_t - zbar) + rho (z_t - q_t)`` to zero for ``t`` in ``B`` and summing
   over ``B`` gives it.) For ``B`` = all times, ``m_B`` is the mean of ``Q``. The step
   is therefore an exact block-coordinate minimisation, for any window.
3. **U-step**: ``U_B += Z_B - (R_B - mu_B)`` (plus ``momentum`` times the previous
   increment of those rows, a heavy-ball extrapolation).
4. **Phi-step** (every ``phi_every`` iterations, frozen after ``phi_freeze``):
   :func:`xadapter.engine.basis.solve_basis` on the feasible point ``W = R - X theta``
   (centred over all stored times), warm-started from the previous basis.

This is the order of DESIGN section 1 (Phi, theta, Z, U) started from an initial
Phi-step on the initial ``W``, computed before the loop.

*Why the Phi-step uses* ``W`` *and not the split variable* ``Z``. At a fixed point
``Z = W``, so both give the same solution, but away from it ``Z`` carries the dual's
memory of the previous basis: ``U`` holds ``-(2/rho) (I - P_prev) W``, so the next
``Z`` is amplified by ``1 + 2/rho`` along directions that were outside the previous
span and shrunk by ``rho/(rho+2)`` along those inside, and an eigen-decomposition of
``Z`` rewards whatever the basis did last. With near-degenerate trailing eigenvalues
(a nominal rank above the true rank) the basis then wanders: on the 1-D benchmark of
the tests with rank 3, the Phi-step on ``Z`` kept a basis change of about 0.75 per
iteration for 200 iterations, while on ``W`` it converged in 23 iterations. The
objective is also evaluated at ``W``: ``history["objective"]`` is the objective at the
current ``(theta, Phi)``.

**Missing entries** (NaN in ``R``) carry no data term: the theta-step ignores them,
and before each Z-step they are filled in ``R`` towards the minimiser of the
objective in them given ``Phi``, ``theta`` and ``m`` (the column mean of ``W`` at the
last evaluation): ``mu + m + Phi_u s``, ``s`` the least-squares scores of the row's
observed entries (:func:`conditional_fill`, over-relaxed by ``FILL_RELAXATION``), so
NaNs never propagate. At a fixed point ``(I - P)(w_t - m)`` vanishes on the missing
coordinates: the stationarity condition of the objective in the missing values. After
the loop a last exact fill (no over-relaxation) precedes the final Phi-step.

**Units.** The data term and the augmented term are both quadratic in the residual
units, so ``rho`` is dimensionless and the iterates do not depend on the units of the
data. The residual standard deviation ``s`` (of the observed ``R - X theta_0``) sets
the absolute tolerances instead.

**Stopping rule**, per window ``B`` of ``b`` rows::

    primal = ||Z_B - (R_B - mu_B)||_F  <= eps
    dual   = rho ||Z_B - Z_B_prev||_F  <= rho * eps
    eps    = tol_abs * s * sqrt(b N) + tol_rel * ||R_B - mu_B||_F
    basis_change = ||Phi Phi^T - Phi_prev Phi_prev^T||_F <= tol_abs + tol_rel * sqrt(K)

(the basis change is measured between spans, so sign flips and rotations inside the
span do not count). The fit stops after at least ``min_iter`` iterations once every
iteration of the last full sweep over the windows (and of the last ``phi_every``
iterations) passes.

With no covariates and no missing entry the loop is skipped: ``Z = R`` and one exact
Phi-step is the answer (``skipped_loop=True``, one history row). With no covariates
but gaps, and every time in each iteration (``batch_size`` None, no momentum, a
Phi-step every iteration), ``Z`` and ``U`` carry nothing the two exact block steps do
not: :mod:`xadapter.engine.alternation` alternates the gap fill and the Phi-step
(Anderson-accelerated), to the same fixed point in fewer and cheaper iterations.

**Where the state lives.** Per-window work (the fill, the Z-step, the U-step) touches
rows of the stored arrays only; the full-field work (the theta-step's ``X^T M y``,
``W`` and its column mean, the Phi-step, the objective) consists of sums and products
over rows. The state (``R`` filled, ``Z``, ``U``) is therefore kept in a store of time
blocks (:mod:`xadapter.engine.store`): numpy data in memory as one block (the arrays
themselves), dask data block by block on disk or on the workers of a
``dask.distributed`` cluster, one block per time chunk. The windows are the same
(``batch_size`` rows) whatever the blocks, so numpy and dask run the same iterations;
a window spanning several blocks takes two passes over them (its ``m_B`` needs sums
over all its rows first).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .basis import LAZY_GRAM_MAX_SITES, DataOperator, solve_basis, subspace_distance
from .kriging import masked_grams
from .checks import nonnegative as _nonnegative
from .progress import progress_bar
from .chunks import centred_moments, compute, is_lazy
from .store import MemoryStore, open_store
from ..exceptions import InputError, ProblemTooLargeError, warn
from .trend import RidgeTrend, as_covariates

HISTORY_KEYS = ("iteration", "primal_residual", "dual_residual", "basis_change", "objective")

#: Iterations between progress lines for ``progress=True`` where no bar can be used
#: (kept for callers that pass an int: ``progress=n`` prints a line every ``n``).
PROGRESS_EVERY = 10


@dataclass
class AdapterFit:
    """Result of :func:`fit_adapter`.

    Attributes
    ----------
    basis : ndarray, shape (N, K)
        Orthonormal spatial basis ``Phi`` (columns ordered by decreasing explained
        variance, largest-magnitude entry positive).
    scores : ndarray, shape (T, K)
        ``a_t = Phi^T (w_t - mean)`` with ``w_t`` the rows of ``filled``: scores of the
        time-centred field, in residual units (``filled ~ mean + scores @ basis.T``).
    mean : ndarray, shape (N,)
        Per-site time mean of ``filled`` (training residual minus trend).
    filled : ndarray, shape (T, N)
        ``W = R - X theta`` with missing entries filled from the low-rank
        reconstruction (exact conditional fill); equal to the residual minus trend at every observed
        entry. No NaN.
    trend_coef : ndarray, shape (p,), or None
        Residual trend coefficients ``theta``; None without covariates.
    history : dict of ndarray
        Equal-length arrays over iterations: ``iteration`` (1-based; 0 for the
        skipped loop), ``primal_residual``, ``dual_residual`` (residual units; without
        a trend, the fill's distance from its conditional minimiser and the length of
        the fill's step, :mod:`xadapter.engine.alternation`),
        ``basis_change`` (span distance), ``objective`` (``||J W (I - P)||^2`` plus
        the penalties at the current ``(theta, Phi)``, residual units squared).
    converged : bool
        The stopping rule was met (True for the skipped loop).
    n_iter : int
        Iterations run (0 when the loop was skipped).
    skipped_loop : bool
        No covariates and no missing entry: the basis is one exact Phi-step.
    rho : float
        ADMM penalty used (dimensionless).
    """

    basis: np.ndarray
    scores: np.ndarray
    mean: np.ndarray
    filled: np.ndarray
    trend_coef: np.ndarray | None
    history: dict = field(default_factory=dict)
    converged: bool = True
    n_iter: int = 0
    skipped_loop: bool = False
    rho: float = 1.0

    def reconstruction(self):
        """``mean + scores @ basis.T`` (T, N): the low-rank part of ``filled``."""
        return self.mean + self.scores @ self.basis.T


# --------------------------------------------------------------------------- validation


def _check_data(data):
    array = np.asarray(data)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"data must be a real numeric (T, N) array, got dtype {array.dtype}.")
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise InputError(f"data must be a 2-D (time, space) array, got shape {array.shape}.")
    n_times, n_sites = array.shape
    if n_times < 3:
        raise InputError(f"the adapter needs at least 3 time steps, got {n_times}.")
    if np.isinf(array).any():
        raise InputError("data contain infinite values; replace them with NaN (missing) or finite values.")
    observed = ~np.isnan(array)
    empty = np.flatnonzero(~observed.any(axis=0))
    if empty.size:
        listed = ", ".join(str(i) for i in empty[:10]) + (", ..." if empty.size > 10 else "")
        raise InputError(f"site(s) with no observation at any time (column index {listed}); "
                         "drop these sites before fitting (they can be kriged afterwards).")
    return array, (None if observed.all() else observed)


def _positive_int(name, value, minimum=1, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


@dataclass
class _Settings:
    rank: int
    omega: object
    tau1: float
    tau2: float
    method: str
    rho: float
    momentum: float
    phi_every: int
    phi_freeze: int | None
    min_iter: int
    max_iter: int
    tol_abs: float
    tol_rel: float

    def basis_tolerance(self):
        """The stopping rule's bound on the span distance between consecutive bases."""
        return self.tol_abs + self.tol_rel * np.sqrt(self.rank)

    def plain_steps(self):
        """No setting that only the ADMM's windows have (Phi-step every iteration, never frozen, no momentum)."""
        return self.phi_every == 1 and self.phi_freeze is None and self.momentum == 0

    def phi_step_due(self, iteration):
        if self.phi_freeze is not None and iteration > self.phi_freeze:
            return False
        return iteration % self.phi_every == 0

    def solve(self, z, init=None):
        return solve_basis(z, self.rank, omega=self.omega, tau1=self.tau1, tau2=self.tau2,
                           init=init, method=self.method)

    def penalty(self, basis):
        value = 0.0
        if self.tau1 > 0:
            value += self.tau1 * float(np.sum(basis * np.asarray(self.omega @ basis)))
        if self.tau2 > 0:
            value += self.tau2 * float(np.sum(np.abs(basis)))
        return value


def _windows(n_times, batch_size):
    if batch_size is None or batch_size >= n_times:
        return [slice(0, n_times)]
    starts = range(0, n_times, batch_size)
    return [slice(start, min(start + batch_size, n_times)) for start in starts]


class _Progress:
    """Reports each history record: to a callable, as periodic lines, or on a bar.

    ``progress`` is True/False/None (a bar over ``max_iter`` iterations, see
    :mod:`xadapter.engine.progress`), an int ``n`` (a line on stderr every ``n``
    iterations, for logs) or a callable (called with every record).
    """

    def __init__(self, progress, max_iter, name="ADMM"):
        self.callback = self.every = None
        self.bar = None
        self.name = name
        if callable(progress):
            self.callback = progress
        elif isinstance(progress, (int, np.integer)) and not isinstance(progress, (bool, np.bool_)):
            self.every = _positive_int("progress", progress)
        else:
            self.bar = progress_bar(progress, max_iter, f"xadapter {name}")

    def __call__(self, record):
        if self.callback is not None:
            self.callback(record)
        elif self.every is not None:
            if record["iteration"] % self.every == 0:
                print(f"xadapter {self.name} iteration {record['iteration']}: primal {record['primal_residual']:.3e}, "
                      f"dual {record['dual_residual']:.3e}, basis change {record['basis_change']:.3e}, "
                      f"objective {record['objective']:.6e}", file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix(primal=f"{record['primal_residual']:.2e}", dual=f"{record['dual_residual']:.2e}",
                                 basis=f"{record['basis_change']:.2e}", refresh=False)
            self.bar.update()

    def close(self, converged):
        if self.bar is not None:
            # a bar that stops short of max_iter says why
            self.bar.set_description(f"xadapter {self.name} converged" if converged
                                    else f"xadapter {self.name} (not converged)")
            self.bar.close()


# --------------------------------------------------------------------------- block kernels
#
# The per-entry state lives in a store (:mod:`xadapter.engine.store`) in blocks of whole
# times: ``data`` (the input), ``resid`` (R with its gaps filled), ``z``, ``u``, ``inc``
# (the last dual increment, with momentum) and ``observed`` (with gaps). A kernel gets
# one block (a dict of arrays), its global rows, and the small shared values; it updates
# the block and returns small results that the driver sums over blocks.


def _trend(covariates, theta, rows):
    """``X theta`` on the global ``rows`` (0 without covariates)."""
    if covariates is None:
        return 0.0
    return covariates.rows(rows).evaluate(theta)


def _global(rows, local):
    return slice(rows.start + local.start, rows.start + local.stop)


def _k_mark_gaps(block, rows):
    block["observed"] = ~np.isnan(block["data"])


def _k_trend_start(block, rows, covariates):
    """``X^T M X`` and ``X^T M y`` of the block (the initial theta-step)."""
    observed = block.get("observed")
    part = covariates.rows(rows)
    return part.gram(observed), part.project(block["data"], observed)


def _k_site_sums(block, rows, covariates, theta):
    """Sums and counts of the observed ``R - X theta`` per site."""
    z = block["data"] - _trend(covariates, theta, rows)
    return np.nansum(z, axis=0), block["observed"].sum(axis=0)


def _k_start(block, rows, covariates, theta, site_mean, momentum):
    """``Z = R - X theta`` with gaps at the site means, ``R`` filled to match, ``U = 0``."""
    data = block["data"]
    mu = _trend(covariates, theta, rows)
    z = data - mu
    observed = block.get("observed")
    if observed is not None:
        missing = ~observed
        resid = data.copy()
        z[missing] = np.broadcast_to(site_mean, z.shape)[missing]
        resid[missing] = (z + mu)[missing]
    else:
        resid = data  # nothing to fill: no copy
    block.update(resid=resid, z=z, u=np.zeros_like(z))
    if momentum > 0:
        block["inc"] = np.zeros_like(z)
    return z.sum(axis=0)


def _k_spread(block, rows, z_mean):
    """Squared deviations of ``Z`` from its column mean over the observed entries, and their count."""
    centred = block["z"] - z_mean
    observed = block.get("observed")
    if observed is None:
        return float(np.sum(centred**2)), centred.size
    return float(np.sum(centred[observed] ** 2)), int(observed.sum())


#: Over-relaxation of the gap fill (1: the exact conditional minimiser).
FILL_RELAXATION = 1.5

#: Bounds the rows :func:`conditional_fill` takes at a time: ``rows x sites x rank``
#: (its temporaries are ``rows x sites`` and ``rows x rank^2``).
_FILL_CHUNK_ENTRIES = 2**22


def _fill(block, rows, local, covariates, theta, w_mean, basis, relaxation=FILL_RELAXATION):
    """Fill the missing entries of ``R`` on the block's rows ``local`` (:func:`conditional_fill`)."""
    observed = block.get("observed")
    if observed is None:
        return
    missing = ~observed[local]
    if not missing.any():
        return
    mu = _trend(covariates, theta, _global(rows, local))
    resid = block["resid"][local]
    conditional_fill(resid, missing, mu + w_mean, basis, relaxation)


def conditional_fill(values, missing, level, basis, relaxation=1.0):
    """Move ``values[missing]`` to the minimiser of ``||(x_t - level)(I - P)||`` over them, in place.

    For a row ``x`` with observed part ``o`` and missing part ``u`` the minimiser is
    ``x_u = level_u + Phi_u s`` with ``s`` the least-squares scores of the observed
    entries, ``(Phi_o^T Phi_o) s = Phi_o^T (x_o - level_o)``: with ``Phi`` orthonormal,
    ``(I - Phi_u Phi_u^T) Phi_u s = Phi_u Phi_o^T Phi_o s``, which is the stationarity
    condition ``[(I - P)(x - level)]_u = 0``. The EM step (``x_u`` from the projection
    of the current row) has the same fixed point but only moves part of the way to it.
    A row observed on fewer sites than the rank takes the minimum-norm scores (the
    minimiser is then not unique); a row with no observation goes to ``level``.

    ``relaxation`` in (0, 2) moves ``x_u`` that multiple of the way to the minimiser.
    The objective is a convex quadratic in ``x_u``, so any such step lowers it; above
    1 the step anticipates the drift of the basis and of the trend, which the next
    iterations would otherwise follow in ever smaller steps (on a 300-station network
    with 20 % gaps and two covariates: 477 ADMM iterations with EM, 415 with the exact
    fill, 299 with 1.5).

    Parameters
    ----------
    values : ndarray, shape (B, N)
        Rows of the filled residual; changed in place at ``missing``.
    missing : ndarray of bool, shape (B, N)
    level : ndarray, shape (B, N) or (N,)
        What the basis does not explain: trend plus site level, in the data's units.
    basis : ndarray, shape (N, K)
        Orthonormal columns.
    relaxation : float
        Step multiple, ``0 < relaxation < 2``.
    """
    rows = np.flatnonzero(missing.any(axis=1))
    n_sites, rank = basis.shape
    step = max(1, _FILL_CHUNK_ENTRIES // max(1, n_sites * rank))
    level = np.broadcast_to(level, values.shape)
    for start in range(0, rows.size, step):
        chunk = rows[start:start + step]
        gaps = missing[chunk]
        centred = np.where(gaps, 0.0, values[chunk] - level[chunk])
        # Phi_o^T Phi_o = I - Phi_u^T Phi_u, with Phi orthonormal
        missed = masked_grams(gaps, basis)
        scores = _least_squares_scores(np.eye(rank) - missed, centred @ basis)
        block = values[chunk]
        target = (level[chunk] + scores @ basis.T)[gaps]
        block[gaps] += relaxation * (target - block[gaps])
        values[chunk] = block


#: Rows whose Gram has a lower bound on its least eigenvalue above this are solved
#: directly (:func:`_least_squares_scores`).
_DIRECT_SOLVE_EIGENVALUE = 0.1


def _least_squares_scores(gram, projected):
    """Minimum-norm solutions of ``gram_b s_b = projected_b``, eigenvalues below 1e-8 dropped.

    ``gram = I - M`` with ``M`` positive semi-definite (``M = Phi_u^T Phi_u``). Rows whose
    least eigenvalue is bounded away from 0 (by ``1 - tr M``, or by Gershgorin's
    discs: ``gram`` is near the identity when few sites are missing) are far from
    singular and take a batched LU solve, several times cheaper than the eigen-
    decomposition the others need to drop null directions (a basis column whose sites
    are all missing in that row).
    """
    scores = np.empty_like(projected)
    diagonal = np.diagonal(gram, axis1=1, axis2=2)
    missed = gram.shape[1] - diagonal.sum(axis=1)  # tr M = K - tr gram
    discs = np.min(2.0 * diagonal - np.abs(gram).sum(axis=2), axis=1)
    direct = np.maximum(1.0 - missed, discs) >= _DIRECT_SOLVE_EIGENVALUE
    if direct.any():
        scores[direct] = np.linalg.solve(gram[direct], projected[direct][:, :, None])[:, :, 0]
    if not direct.all():
        eigenvalues, vectors = np.linalg.eigh(gram[~direct])
        inverse = np.where(eigenvalues > 1e-8, 1.0 / np.maximum(eigenvalues, 1e-8), 0.0)
        rotated = np.einsum("bjk,bj->bk", vectors, projected[~direct]) * inverse
        scores[~direct] = np.einsum("bkj,bj->bk", vectors, rotated)
    return scores


def _k_window_sums(block, rows, local, covariates, theta, w_mean, basis):
    """Fill the window's gaps; column sums of ``Q = R - mu - U`` and of the old ``Z`` there."""
    _fill(block, rows, local, covariates, theta, w_mean, basis)
    mu = _trend(covariates, theta, _global(rows, local))
    q = block["resid"][local] - mu - block["u"][local]
    return q.sum(axis=0), block["z"][local].sum(axis=0)


def _k_z_step(block, rows, local, covariates, theta, w_mean, basis, rho, momentum, mean, col_sum, n_times):
    """Exact minimisation over the window's rows of the block, then the U-step.

    ``mean`` is the window's ``m_B``; None when the window lies in this block, and then
    the gaps are filled and ``m_B`` computed here (from ``col_sum``, the column sum of
    ``Z`` over all times). Returns the squared primal and dual residuals, the squared
    norm of ``R_B - mu_B`` about ``w_mean`` and the change of the column sum of ``Z``.
    """
    if mean is None:
        _fill(block, rows, local, covariates, theta, w_mean, basis)
    mu = _trend(covariates, theta, _global(rows, local))
    target = block["resid"][local] - mu
    u = block["u"]
    q = target - u[local]
    z_old = block["z"][local]
    if mean is None:
        outside = col_sum - z_old.sum(axis=0)
        mean = ((2.0 + rho) * outside + rho * q.sum(axis=0)) / ((2.0 + rho) * n_times - 2.0 * z_old.shape[0])
    centred = q - mean
    z_new = mean + (rho / (rho + 2.0)) * centred + (2.0 / (rho + 2.0)) * ((centred @ basis) @ basis.T)
    increment = z_new - target
    dual_sq = rho**2 * float(np.sum((z_new - z_old) ** 2))
    primal_sq = float(np.sum(increment**2))
    if momentum > 0:
        u[local] += increment + momentum * block["inc"][local]
        block["inc"][local] = increment
    else:
        u[local] += increment
    change = z_new.sum(axis=0) - z_old.sum(axis=0)
    block["z"][local] = z_new
    return primal_sq, dual_sq, float(np.sum((target - w_mean) ** 2)), change


def _k_trend_target(block, rows, covariates):
    """``X^T M (R - Z - U)`` of the block: the theta-step's right-hand side."""
    return covariates.rows(rows).project(block["resid"] - block["z"] - block["u"], block.get("observed"))


def _feasible_block(block, rows, covariates, theta):
    """``W = R - X theta`` on the block's rows."""
    return block["resid"] - _trend(covariates, theta, rows)


def _k_feasible_sums(block, rows, covariates, theta, shift, gram, project):
    """Column sums of ``W - shift``, their squares summed, ``(W - shift)^T (W - shift)``
    (with ``gram``) and the next theta-step's ``X^T M (R - Z - U)`` (with ``project``)."""
    w = _feasible_block(block, rows, covariates, theta) - shift
    projection = _k_trend_target(block, rows, covariates) if project else None
    return w.sum(axis=0), np.einsum("tn,tn->n", w, w), (w.T @ w if gram else None), projection


def _k_times(block, rows, covariates, theta, mean, v):
    return (_feasible_block(block, rows, covariates, theta) - mean) @ v


def _k_rtimes(block, rows, w_rows, covariates, theta, mean):
    return (_feasible_block(block, rows, covariates, theta) - mean).T @ w_rows


def _k_gram_times(block, rows, covariates, theta, mean, v):
    centred = _feasible_block(block, rows, covariates, theta) - mean
    return centred.T @ (centred @ v)


class _FeasibleBlocks(DataOperator):
    """The centred feasible point ``Wc = R - X theta - 1 mean^T`` over a store of blocks.

    Built with one pass over the blocks that gives the column mean and (up to
    :data:`xadapter.engine.basis.LAZY_GRAM_MAX_SITES` sites) the Gram matrix; the basis
    step then needs no further pass on the Gram path, and one pass per product above
    it. Sums are accumulated about ``shift`` (the previous mean, close to the new one)
    and corrected exactly, so that no precision is lost to large site levels.
    """

    lazy = True
    center = True

    def __init__(self, store, covariates, theta, shift, project=False):
        self.store, self.covariates, self.theta = store, covariates, theta
        self.n_times, self.n_sites = store.shape
        want_gram = self.n_sites <= LAZY_GRAM_MAX_SITES
        # the same pass gives the next theta-step's right-hand side (R, Z, U do not change
        # between this pass and the next theta-step), saving a pass per iteration
        sums, squares, gram, self.projection = store.reduce(
            _k_feasible_sums, args=(covariates, theta, store.share(shift), want_gram, project),
            reads=("resid",) + (("z", "u", "observed") if project else ()))
        offset = sums / self.n_times
        self.mean = shift + offset
        # sum over times of (w - mean)^2 per site: the shifted sums less T offset^2
        self.column_ss = np.maximum(squares - self.n_times * offset**2, 0.0)
        self._gram = None
        if want_gram:
            gram -= self.n_times * np.outer(offset, offset)
            self._gram = 0.5 * (gram + gram.T)

    def _args(self):
        return self.covariates, self.theta, self.store.share(self.mean)

    def times(self, v):
        parts = self.store.apply(_k_times, args=self._args() + (self.store.share(np.asarray(v)),),
                                 reads=("resid",))
        return np.concatenate(parts, axis=0)

    def rtimes(self, w):
        w = np.asarray(w)
        return self.store.reduce(_k_rtimes, args=self._args(),
                                 block_args=[(w[rows],) for rows in self.store.rows], reads=("resid",))

    def gram_times(self, v):
        if self._gram is not None:
            return self._gram @ v
        return self.store.reduce(_k_gram_times, args=self._args() + (self.store.share(np.asarray(v)),),
                                 reads=("resid",))

    def score_gram(self, q):
        if self._gram is not None:
            return q.T @ (self._gram @ q)
        return super().score_gram(q)

    def score_variance(self, q):
        if self._gram is not None:
            return np.einsum("nk,nk->k", q, self._gram @ q)
        return super().score_variance(q)

    def gram_space(self):
        if self._gram is None:
            raise ProblemTooLargeError(f"{self.n_sites} sites: the N x N Gram matrix of the stored field "
                                       "is not formed; use the matrix-free basis step.")
        return self._gram

    def gram_time(self):
        raise ProblemTooLargeError("the T x T Gram matrix of the stored field is not formed.")

    def total(self):
        """``||Wc||_F^2``."""
        return float(np.sum(self.column_ss))


def _minus_trend(resid, covariates, theta, block_info=None):
    start, stop = block_info[0]["array-location"][0]
    return resid - covariates.rows(slice(start, stop)).evaluate(theta)


# --------------------------------------------------------------------------- the driver


class _Driver:
    """The ADMM's state and steps over a store of time blocks.

    ``col_sum`` (N,) is the running column sum of ``Z`` (for the centred Z-step);
    ``w_mean`` (N,) the column mean of the feasible point ``W = R - X theta`` at the
    last full evaluation (for the gap fill).
    """

    def __init__(self, store, any_missing, covariates, ridge, settings, init):
        self.store = store
        self.settings = settings
        self.n_times, self.n_sites = store.shape
        self.covariates = covariates
        self.shared_covariates = store.share(covariates)
        self.any_missing = any_missing
        self.theta = self.trend = None
        self._projection = None
        if any_missing and "observed" not in store.names:
            store.apply(_k_mark_gaps, writes=("observed",), reads=("data",))
        if covariates is not None:
            gram, projection = store.reduce(_k_trend_start, args=(self.shared_covariates,),
                                            reads=("data", "observed"))
            self.trend = RidgeTrend(covariates, ridge, gram=gram)
            self.theta = self.trend.solve_projected(projection)
        site_mean = None
        if any_missing:
            sums, counts = store.reduce(_k_site_sums, args=(self.shared_covariates, self.theta),
                                        reads=("data", "observed"))
            site_mean = sums / counts
        self.col_sum = store.reduce(_k_start, args=(self.shared_covariates, self.theta, site_mean,
                                                    settings.momentum),
                                    writes=("resid", "z", "u") + (("inc",) if settings.momentum > 0 else ()),
                                    reads=("data", "observed"))
        # the spread about each site's own level: the tolerances must not depend on how far
        # the site levels are from zero (a constant added to a site changes nothing else)
        squares, count = store.reduce(_k_spread, args=(self.col_sum / self.n_times,), reads=("z", "observed"))
        spread = float(np.sqrt(squares / count))
        self.scale = spread if spread > 0 else 1.0
        self.w_mean = self.col_sum / self.n_times
        # at the start W = R - X theta is Z
        start = store.array("z") if isinstance(store, MemoryStore) else \
            _FeasibleBlocks(store, self.shared_covariates, self.theta, self.w_mean)
        self.basis = settings.solve(start, init=init)

    # -- pieces of one iteration
    def theta_step(self):
        if self.trend is not None and self._projection is not None:
            self.theta = self.trend.solve_projected(self._projection)
            self._projection = None
        elif self.trend is not None:
            projection = self.store.reduce(_k_trend_target, args=(self.shared_covariates,),
                                           reads=("resid", "z", "u", "observed"))
            self.theta = self.trend.solve_projected(projection)

    def z_step(self, window):
        """Fill the window's gaps, minimise over its rows exactly, then the U-step.

        Returns the primal and dual residuals and the norm of ``R_B - mu_B`` about the
        site levels (the column mean of ``W``), the scale of the relative tolerance.
        """
        s, store = self.settings, self.store
        pieces = list(store.overlapping(window))
        basis = store.share(self.basis)
        common = (self.shared_covariates, self.theta, self.w_mean, basis)
        mean = None
        if len(pieces) > 1:
            # m_B needs sums over the whole window before any of its rows is updated
            q_sum, z_sum = store.reduce(_k_window_sums, [i for i, _, _ in pieces], args=common,
                                        block_args={i: (local,) for i, local, _ in pieces},
                                        writes=("resid",), reads=("resid", "u", "z", "observed"))
            size = window.stop - window.start
            rho = s.rho
            mean = ((2.0 + rho) * (self.col_sum - z_sum) + rho * q_sum) / ((2.0 + rho) * self.n_times - 2.0 * size)
        primal_sq, dual_sq, norm_sq, change = store.reduce(
            _k_z_step, [i for i, _, _ in pieces],
            args=common + (s.rho, s.momentum, store.share(mean), store.share(self.col_sum), self.n_times),
            block_args={i: (local,) for i, local, _ in pieces},
            writes=("z", "u", "inc") + (("resid",) if mean is None else ()), reads=None)
        self.col_sum = self.col_sum + change
        return float(np.sqrt(primal_sq)), float(np.sqrt(dual_sq)), float(np.sqrt(norm_sq))

    def feasible(self):
        """``W = R - X theta`` (T, N), the residual minus the current trend; sets ``w_mean``.

        numpy data: the array. Data in blocks: a :class:`_FeasibleBlocks` operator.
        """
        if isinstance(self.store, MemoryStore):
            resid = self.store.array("resid")
            w = resid if self.covariates is None else resid - self.covariates.evaluate(self.theta)
            self.w_mean = w.mean(axis=0)
            return w
        w = _FeasibleBlocks(self.store, self.shared_covariates, self.theta, self.w_mean,
                            project=self.trend is not None)
        self.w_mean = w.mean
        self._projection = w.projection
        return w

    def filled(self):
        """``W`` as one array: numpy, or a dask array over the blocks."""
        resid = self.store.array("resid")
        if self.covariates is None:
            return resid
        if is_lazy(resid):
            return resid.map_blocks(_minus_trend, self.covariates, self.theta, dtype=np.float64)
        return resid - self.covariates.evaluate(self.theta)

    def phi_step(self, w):
        new = self.settings.solve(w, init=self.basis)
        change = subspace_distance(new, self.basis)
        self.basis = new
        return change

    def objective(self, w):
        """``||J W (I - P)||^2`` plus the penalties: the objective at the current iterate."""
        if isinstance(w, _FeasibleBlocks):
            explained = float(np.sum(self.basis * w.gram_times(self.basis)))
            return w.total() - explained + self.settings.penalty(self.basis)
        centred = w - self.w_mean
        scores = centred @ self.basis
        return float(np.sum(centred**2) - np.sum(scores**2)) + self.settings.penalty(self.basis)

    # -- the final state
    def finish(self, refresh_basis):
        if self.any_missing:
            store = self.store
            basis = store.share(self.basis)
            store.apply(_fill, args=(self.shared_covariates, self.theta, self.w_mean, basis, 1.0),
                        block_args=[(slice(0, rows.stop - rows.start),) for rows in store.rows],
                        writes=("resid",), reads=("resid", "observed"))
        feasible = self.feasible()
        basis = self.settings.solve(feasible, init=self.basis) if refresh_basis else self.basis
        if isinstance(feasible, _FeasibleBlocks):
            return self.filled(), self.w_mean, feasible.times(basis), basis
        return feasible, self.w_mean, (feasible - self.w_mean) @ basis, basis


def warn_not_converged(loop, settings, history, residual):
    """The RuntimeWarning of a loop that ran ``max_iter`` iterations without meeting its
    stopping rule; ``residual`` names its ``primal_residual``."""
    # name the settings a user of SpatialAdapter has (max_iter, tol = tol_rel, history)
    warn(f"the {loop} did not meet its stopping rule in max_iter = {settings.max_iter} iterations "
         f"(last basis change {history['basis_change'][-1]:.2e}, {residual} "
         f"{history['primal_residual'][-1]:.2e}); the result is the last iterate. Raise the "
         "iteration limit or loosen the tolerance: SpatialAdapter(max_iter=..., tol=...) "
         "(fit_adapter: max_iter, tol_rel, tol_abs); adapter.history shows the residuals "
         "per iteration.", RuntimeWarning)


def history_arrays(history):
    """Lists of history records as arrays (``iteration`` as integers)."""
    return {key: np.asarray(values, dtype=np.int64 if key == "iteration" else np.float64)
            for key, values in history.items()}


def _tolerance(settings, scale, size, data_norm):
    return settings.tol_abs * scale * np.sqrt(size) + settings.tol_rel * data_norm


def fit_adapter(data, rank, *, omega=None, tau1=0.0, tau2=0.0, covariates=None, ridge=1e-6, rho=1.0,
                batch_size=None, phi_every=1, phi_freeze=None, momentum=0.0, min_iter=5, max_iter=500,
                tol_abs=1e-6, tol_rel=1e-4, seed=0, method="auto", init=None, progress=None,
                has_gaps=None, workspace=None):
    """Fit the spatial adapter: basis, scores, per-site mean and residual trend.

    Runs the three-block ADMM described in the module docstring; without covariates
    (and with ``batch_size``, ``momentum``, ``phi_every`` and ``phi_freeze`` at their
    defaults) the Anderson-accelerated alternation of the gap fill and the Phi-step
    (:mod:`xadapter.engine.alternation`), which reaches the same fixed point, and with
    neither covariates nor gaps one exact Phi-step.

    Parameters
    ----------
    data : array_like, shape (T, N)
        Residuals ``R`` of the frozen first stage, time rows and space columns, NaN
        where missing. Every site needs at least one observation; a time with none is
        allowed (it is filled).
    rank : int
        Nominal rank ``K`` (``1 <= K < N``).
    omega : ndarray or sparse matrix, shape (N, N), optional
        Smoothness penalty (needed when ``tau1 > 0``).
    tau1, tau2 : float
        Smoothness and sparsity weights of the Phi-step (see
        :func:`xadapter.engine.basis.solve_basis`).
    covariates : array_like, optional
        Trend covariates ``(T, N, p)``, ``(T, p)`` or ``(N, p)`` (see
        :func:`xadapter.engine.trend.as_covariates`). None: no trend.
    ridge : float, default 1e-6
        Ridge weight of the theta-step (added to ``X^T M X``).
    rho : float, default 1.0
        ADMM penalty, dimensionless (see "Units" in the module docstring).
    batch_size : int or "chunks", optional
        Rows per window (contiguous times); None: all times in every iteration;
        ``"chunks"``: the time chunks of dask ``data`` (all times for numpy data), so
        that each Z-step reads and writes one block of the state.
    phi_every : int, default 1
        Run the Phi-step every ``phi_every`` iterations.
    phi_freeze : int, optional
        Keep the basis fixed after this many iterations (then no final refresh).
    momentum : float, default 0
        Heavy-ball weight ``0 <= momentum < 1`` on the dual update.
    min_iter, max_iter : int
        Iteration bounds (one iteration = one window).
    tol_abs, tol_rel : float
        Absolute (in units of the residual standard deviation per entry) and relative
        tolerances of the stopping rule.
    seed : int
        Seed of the order in which windows are visited (shuffled each sweep).
    method : {"auto", "dense", "matrix-free"}
        Eigensolver of the Phi-step.
    init : array_like, shape (N, K), optional
        Warm start of the first Phi-step (e.g. the basis at a neighbouring ``tau1``);
        see :func:`xadapter.engine.basis.solve_basis`.
    progress : bool, None, int or callable, default None
        True: a bar over the iterations on stderr (closed early on convergence, with
        the primal and dual residuals and the basis change); False: silent; None: a
        bar only when stderr is a terminal (:mod:`xadapter.engine.progress`). An int
        ``n``: a line on stderr every ``n`` iterations (for logs); a callable: called
        with the history record (a dict) of every iteration.
    has_gaps : bool, optional
        Whether any entry of a dask ``data`` is missing, when the caller knows
        (saves one pass over the data); ignored for numpy data.
    workspace : str, optional
        Directory for the scratch files of dask ``data`` on a local scheduler (default:
        dask's ``temporary-directory``, else the system's); see
        :mod:`xadapter.engine.store`.

    Returns
    -------
    AdapterFit
        After the loop, missing entries get a last fill and (unless the basis is
        frozen) the basis is refreshed by one exact Phi-step on the final ``filled``,
        so that ``basis``, ``filled``, ``mean`` and ``scores`` are mutually exact.

    Raises
    ------
    InputError
        Bad shapes or settings, infinite values, a site with no observation (named by
        its column index), invalid covariates.

    Warns
    -----
    RuntimeWarning
        The stopping rule was not met within ``max_iter`` iterations (the result is
        the last iterate; ``converged`` is False).
    """
    if is_lazy(data):
        # the pipeline has checked the data (one pass); it says whether anything is missing
        any_missing = bool(compute(np.isnan(data).any())[0]) if has_gaps is None else bool(has_gaps)
    else:
        data, observed = _check_data(data)
        any_missing = observed is not None
    n_times, n_sites = data.shape
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank < n_sites:
        raise InputError(f"rank must be an integer with 1 <= rank < number of sites ({n_sites}), got {rank!r}.")
    settings = _Settings(
        rank=int(rank), omega=omega, tau1=_nonnegative("tau1", tau1), tau2=_nonnegative("tau2", tau2),
        method=method, rho=_nonnegative("rho", rho, strict=True),
        momentum=_nonnegative("momentum", momentum, below=1.0),
        phi_every=_positive_int("phi_every", phi_every),
        phi_freeze=_positive_int("phi_freeze", phi_freeze, minimum=0, allow_none=True),
        min_iter=_positive_int("min_iter", min_iter, minimum=0),
        max_iter=_positive_int("max_iter", max_iter),
        tol_abs=_nonnegative("tol_abs", tol_abs), tol_rel=_nonnegative("tol_rel", tol_rel),
    )
    if batch_size != "chunks":
        batch_size = _positive_int("batch_size", batch_size, allow_none=True)
    ridge = _nonnegative("ridge", ridge)
    if covariates is not None:
        covariates = as_covariates(covariates, n_times, n_sites)

    if covariates is None and not any_missing:
        return _exact_fit(data, settings, init)

    store = open_store(data, workspace, observed=None if is_lazy(data) else observed)
    if covariates is None and batch_size is None and settings.plain_steps():
        from .alternation import fit_by_alternation  # it builds on this module's kernels

        return fit_by_alternation(store, settings, init, _Progress(progress, settings.max_iter, "fit"))
    report = _Progress(progress, settings.max_iter)
    driver = _Driver(store, any_missing, covariates, ridge, settings, init)
    windows = list(store.rows) if batch_size == "chunks" else _windows(n_times, batch_size)
    rng = np.random.default_rng(seed)
    sweep = max(len(windows), settings.phi_every)
    basis_tol = settings.basis_tolerance()
    history = {key: [] for key in HISTORY_KEYS}
    passed = []
    converged = False
    order = []
    iteration = 0
    for iteration in range(1, settings.max_iter + 1):
        if not order:
            order = list(rng.permutation(len(windows))) if len(windows) > 1 else [0]
        rows = windows[order.pop(0)]
        driver.theta_step()
        primal, dual, data_norm = driver.z_step(rows)
        feasible = driver.feasible()
        change = driver.phi_step(feasible) if settings.phi_step_due(iteration) else 0.0
        record = {"iteration": iteration, "primal_residual": primal, "dual_residual": dual,
                  "basis_change": change, "objective": driver.objective(feasible)}
        for key in HISTORY_KEYS:
            history[key].append(record[key])
        report(record)
        eps = _tolerance(settings, driver.scale, (rows.stop - rows.start) * n_sites, data_norm)
        passed.append(primal <= eps and dual <= settings.rho * eps and change <= basis_tol)
        if iteration >= max(settings.min_iter, sweep) and all(passed[-sweep:]):
            converged = True
            break

    report.close(converged)
    if not converged:
        warn_not_converged("ADMM", settings, history, "primal residual")
    frozen = settings.phi_freeze is not None and iteration > settings.phi_freeze
    filled, mean, scores, basis = driver.finish(refresh_basis=not frozen)
    return AdapterFit(
        basis=basis,
        scores=scores,
        mean=mean,
        filled=filled,
        trend_coef=None if driver.theta is None else np.array(driver.theta),
        history=history_arrays(history),
        converged=converged,
        n_iter=iteration,
        skipped_loop=False,
        rho=settings.rho,
    )


def _exact_fit(data, settings, init):
    """No trend, no missing entry: ``Z = R`` and one exact Phi-step.

    On dask data ``filled`` stays the lazy input and the scores, mean and objective
    come from one pass over its time chunks.
    """
    basis = settings.solve(data, init=init)
    # the mean first: a graph that needs it and then every chunk again would hold all chunks
    (mean,) = compute(data.mean(axis=0))
    scores, total, _, _ = centred_moments(data, mean, basis)
    objective = float(total - np.sum(scores**2)) + settings.penalty(basis)
    history = {"iteration": np.array([0], dtype=np.int64), "primal_residual": np.zeros(1),
               "dual_residual": np.zeros(1), "basis_change": np.zeros(1), "objective": np.array([objective])}
    # no copy: nothing downstream writes to the filled field
    filled = data if is_lazy(data) else np.asarray(data, dtype=np.float64)
    return AdapterFit(basis=basis, scores=scores, mean=mean, filled=filled,
                      trend_coef=None, history=history, converged=True, n_iter=0, skipped_loop=True,
                      rho=settings.rho)
