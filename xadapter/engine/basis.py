"""The Phi-step: a smooth, sparse, orthonormal spatial basis from a residual matrix.

Given residuals ``D`` of shape ``(T, N)`` (time rows, space columns), time-centred
``Dc = D - 1 mean^T``, a symmetric smoothness penalty ``Omega`` (N x N) and weights
``tau1`` (smoothness) and ``tau2`` (sparsity), :func:`solve_basis` returns::

    Phi = argmax_{Phi^T Phi = I_K}  tr(Phi^T (Dc^T Dc - tau1 Omega) Phi) - tau2 |Phi|_1

(DESIGN section 1, Phi-step).

``tau2 == 0``
    The exact top-``K`` eigenvectors of ``A = Dc^T Dc - tau1 Omega``. Three solvers:

    * ``"dense"``: form ``A`` (N x N) and call LAPACK ``eigh`` on the top ``K``
      eigenvalues. ``"auto"`` uses it up to :data:`AUTO_DENSE_MAX_SITES` sites when a
      penalty is active; it is refused above :data:`DENSE_MAX_SITES`.
    * dual (no active penalty and ``T < N``): ``Dc^T Dc`` and ``Dc Dc^T`` share their
      non-zero eigenvalues, so the problem is solved on the ``T x T`` matrix
      ``Dc Dc^T`` (formed chunk by chunk when ``T <=`` :data:`DUAL_GRAM_MAX_TIMES`,
      else applied as an operator) and ``Phi = Dc^T U diag(s)^-1``.
    * ``"matrix-free"``: implicitly restarted Lanczos (ARPACK ``eigsh``) on the operator
      ``v -> Dc^T (Dc v) - tau1 Omega v``; no N x N array is ever allocated. A previous
      basis passed as ``init`` seeds the Krylov space (warm start).

    Every path ends with a Rayleigh-Ritz step on the found subspace, so the columns
    are orthonormal to rounding and are exact eigenvectors of ``A``.

``tau2 > 0``
    The SpatPCA inner ADMM (Wang & Huang 2017): ``Phi`` is split into a sparse copy
    ``R`` (soft thresholding) and an orthonormal copy ``C`` (polar factor by thin SVD),
    with scaled duals, a linear solve with ``2 (rho I - A)`` per iteration and a
    primal/dual stopping rule. See :func:`solve_basis` for what is returned.

Conventions of the returned basis: columns ordered by decreasing explained variance
``||Dc phi_k||^2``; each column's largest-magnitude entry is positive.

The data enter only through ``data @ v``, ``data.T @ w``, ``data.mean(axis=0)`` and
column/row slices, so a dask array evaluated chunk by chunk can take the place of the
numpy array; a centred copy of the data is never made.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .checks import nonnegative
from .chunks import is_lazy, materialise, time_blocks
from ..exceptions import InputError, ProblemTooLargeError, warn

#: ``method="auto"`` with an active penalty uses the dense eigensolver up to this many
#: sites and the matrix-free Lanczos solver above. Measured on 2 cores at T = 500:
#: dense ``eigh`` takes about 0.3 s at N = 2000 and 1.3 s at N = 3000 against
#: 0.1-0.3 s for Lanczos; the dense path is kept for small N because it needs no
#: iteration and handles clustered eigenvalues without restarts.
AUTO_DENSE_MAX_SITES = 2000

#: ``method="dense"`` is refused above this many sites (the N x N matrix alone takes
#: ``8 N^2`` bytes: 3.2 GB at 20,000 sites).
DENSE_MAX_SITES = 20000

#: The dual path forms the ``T x T`` Gram matrix ``Dc Dc^T`` up to this many time
#: steps (72 MB); above, it applies ``Dc Dc^T`` as an operator.
DUAL_GRAM_MAX_TIMES = 3000

#: Dask-backed data: up to this many sites the space Gram matrix ``Dc^T Dc`` (N x N,
#: 200 MB at the limit) is accumulated in one pass over the time chunks and diagonalised
#: densely; above, the block solver applies ``Dc^T (Dc V)`` one pass per iteration.
LAZY_GRAM_MAX_SITES = 5000

#: Residual norm, relative to the operator's scale, at which the block eigensolver stops.
#: Measured at N = 20,000, T = 500, K = 10 (graph penalty): 1e-6 takes 38 passes and
#: leaves the leading subspace 2.5e-8 from the exact one (the noise directions 5e-6);
#: 1e-8 takes 245 passes.
LAZY_BLOCK_TOL = 1e-6

#: Iterations of the block eigensolver on dask-backed data above
#: :data:`LAZY_GRAM_MAX_SITES` (one pass over the data each). The leading (signal)
#: directions converge well within it; on 1e5 sites the near-tied noise directions
#: beyond the effective rank would take ~200 passes to reach the tolerance, and the
#: Rayleigh-Ritz step that follows makes whatever subspace is found exactly orthonormal.
LAZY_BLOCK_MAX_ITER = 60

#: Time steps (dual) at or below which the small Gram matrix is diagonalised by LAPACK
#: rather than by Lanczos.
_SMALL_DENSE = 300

#: Bytes of data made into a centred, contiguous block at a time when forming a Gram
#: matrix.
_CHUNK_BYTES = 32 * 2**20

METHODS = ("auto", "dense", "matrix-free")

_ADMM_DEFAULT_TOL = 1e-5
_ADMM_DEFAULT_MAX_ITER = 5000
#: Default ADMM penalty ``rho = _RHO_FACTOR * max_k ||Dc phi_k||^2``. SpatPCA uses 10.
#: On 32 sparse problems (N = 400, four tau1/tau2 settings, four seeds) factors 3, 5
#: and 10 reached the same objective with iteration counts roughly proportional to
#: the factor; 2 was erratic and 1.5 diverged (the Phi-update gain
#: ``rho / (2 (rho - lambda))`` exceeds 1 below 2). 4 keeps a margin.
_RHO_FACTOR = 4.0


# --------------------------------------------------------------------------- helpers


def _frobenius(a):
    return float(np.sqrt(np.sum(a * a)))


def _orthonormalise(a):
    """Orthonormal basis of span(a) by thin QR; columns must be independent."""
    q, r = np.linalg.qr(a)
    diag = np.abs(np.diag(r))
    if diag.size and diag.min() <= 1e-12 * max(diag.max(), np.finfo(float).tiny):
        raise InputError("the columns of the basis are linearly dependent (rank deficient); "
                         "pass a matrix of full column rank.")
    return q


def _polar(a):
    """Nearest matrix with orthonormal columns, ``U V^T`` from the thin SVD of ``a``."""
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def _soft_threshold(a, threshold):
    return np.sign(a) * np.maximum(np.abs(a) - threshold, 0.0)


def subspace_distance(a, b):
    """Distance between the column spaces of two bases, ``||P_a - P_b||_F``.

    ``P_a`` is the orthogonal projector on ``span(a)``. No ``N x N`` matrix is formed:
    with ``Qa``, ``Qb`` orthonormal bases of the two spans,
    ``||P_a - P_b||_F^2 = ||Qb - Qa (Qa^T Qb)||_F^2 + ||Qa - Qb (Qb^T Qa)||_F^2``,
    which equals ``2 k - 2 ||Qa^T Qb||_F^2`` for equal widths ``k`` but, unlike that
    form, keeps full relative accuracy for nearly equal spans (distances down to
    about ``1e-15`` rather than ``1e-7``).

    Parameters
    ----------
    a : array_like, shape (N, ka)
    b : array_like, shape (N, kb)
        Bases of full column rank; they are orthonormalised (thin QR) first, so only
        their spans matter.

    Returns
    -------
    float
        0 for equal spans, ``sqrt(ka + kb)`` at most (orthogonal spans).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise InputError(f"bases must be (N, k) arrays with the same N, got shapes {a.shape} and {b.shape}.")
    qa = _orthonormalise(a)
    qb = _orthonormalise(b)
    cross = qa.T @ qb
    off_b = qb - qa @ cross
    off_a = qa - qb @ cross.T
    return float(np.sqrt(np.sum(off_b * off_b) + np.sum(off_a * off_a)))


# --------------------------------------------------------------------------- the data operator


class DataOperator:
    """The time-centred data ``Dc`` (T x N) as the basis step uses it.

    :func:`solve_basis` takes an array, or an instance of a subclass (data kept
    elsewhere, e.g. in the ADMM's store of time blocks) providing ``n_times``,
    ``n_sites``, ``center``, ``mean`` (N,), ``lazy`` (passes over the data are costly:
    the dual and the dense path beyond :data:`LAZY_GRAM_MAX_SITES` are not used) and
    the products ``times(v) = Dc v``, ``rtimes(w) = Dc^T w``, ``gram_times(v) =
    Dc^T (Dc v)``, ``gram_space() = Dc^T Dc`` and ``gram_time() = Dc Dc^T``.
    """

    lazy = False

    def score_gram(self, q):
        """``(Dc q)^T (Dc q)`` (k, k) for ``q`` (N, k)."""
        scores = self.times(q)
        return scores.T @ scores

    def score_variance(self, q):
        """``||Dc q_k||^2`` per column of ``q`` (N, k)."""
        return np.sum(self.times(q) ** 2, axis=0)


class _CentredData(DataOperator):
    """``Dc = D - 1 mean^T`` applied without forming it.

    ``Dc v = D v - 1 (mean^T v)`` and ``Dc^T w = D^T w - mean (1^T w)``.
    """

    def __init__(self, data, center):
        self.data = data
        self.lazy = is_lazy(data)
        self.n_times, self.n_sites = data.shape
        if center:
            self.mean = materialise(data.mean(axis=0))
        else:
            self.mean = np.zeros(self.n_sites)
        self.center = bool(center)

    def times(self, v):
        """``Dc v``: (N,) -> (T,) or (N, k) -> (T, k)."""
        return materialise(self.data @ v) - self.mean @ v

    def rtimes(self, w):
        """``Dc^T w``: (T,) -> (N,) or (T, k) -> (N, k)."""
        return materialise(self.data.T @ w) - np.multiply.outer(self.mean, np.sum(w, axis=0))

    def gram_times(self, v):
        """``Dc^T (Dc v)``; on dask data one pass over the time chunks."""
        if is_lazy(self.data):
            centred = self.data - self.mean
            return materialise(centred.T @ (centred @ v))
        return self.rtimes(self.times(v))

    def _block(self, rows=slice(None), cols=slice(None)):
        block = materialise(self.data[rows, cols])
        return block - self.mean[cols]

    def gram_space(self):
        """``Dc^T Dc`` (N x N), accumulated over blocks of time rows (dask: its chunks)."""
        if is_lazy(self.data):
            # folded chunk by chunk into one accumulator (symmetric rank-k updates in place)
            gram = np.zeros((self.n_sites, self.n_sites), order="F")
            for block in time_blocks(self.data - self.mean):
                gram = sla.blas.dsyrk(1.0, np.asarray(block, dtype=np.float64), beta=1.0, c=gram, trans=1,
                                      overwrite_c=1)
            return _mirror_upper(gram)
        step = max(1, _CHUNK_BYTES // (8 * self.n_sites))
        gram = np.zeros((self.n_sites, self.n_sites))
        for start in range(0, self.n_times, step):
            block = self._block(rows=slice(start, start + step))
            gram += block.T @ block
        return gram

    def gram_time(self):
        """``Dc Dc^T`` (T x T), accumulated over blocks of site columns."""
        step = max(1, _CHUNK_BYTES // (8 * self.n_times))
        gram = np.zeros((self.n_times, self.n_times))
        for start in range(0, self.n_sites, step):
            block = self._block(cols=slice(start, start + step))
            gram += block @ block.T
        return gram


def _mirror_upper(matrix, step=512):
    """Copy the upper triangle of a square matrix onto its lower triangle, in place."""
    for start in range(0, matrix.shape[0], step):
        stop = start + step
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T
        block = matrix[start:stop, start:stop]
        block[np.tril_indices_from(block, -1)] = block.T[np.tril_indices_from(block, -1)]
    return matrix


class _Objective:
    """``A v = Dc^T (Dc v) - tau1 Omega v``, counting the vectors it is applied to."""

    def __init__(self, ops, omega, tau1):
        self.ops = ops
        self.omega = omega if tau1 > 0 else None
        self.tau1 = float(tau1)
        self.n_applied = 0

    @property
    def penalised(self):
        return self.omega is not None

    def penalty(self, v):
        if self.omega is None:
            return np.zeros_like(v)
        return self.tau1 * np.asarray(self.omega @ v)

    def __call__(self, v):
        self.n_applied += 1 if v.ndim == 1 else v.shape[1]
        out = self.ops.gram_times(v)
        if self.omega is not None:
            out -= self.penalty(v)
        return out

    def dense(self):
        matrix = self.ops.gram_space()
        if self.omega is not None:
            omega = self.omega.toarray() if sp.issparse(self.omega) else np.asarray(self.omega)
            matrix -= self.tau1 * omega
        return matrix


# --------------------------------------------------------------------------- validation


def _check_data(data):
    if not is_lazy(data):
        data = np.asarray(data)
        if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
            raise InputError(f"data must be a real numeric (T, N) array, got dtype {data.dtype}.")
        data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise InputError(f"data must be a 2-D (time, space) array, got {data.ndim} dimension(s).")
    finite = np.isfinite(data).all()
    if is_lazy(finite):
        finite = finite.compute()
    if not finite:
        raise InputError("data contain NaN or infinite values; fill or drop missing values first "
                         "(the ADMM driver fills them from the reconstruction).")
    return data


def _check_rank(rank, n_sites):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise InputError(f"rank must be an integer, got {rank!r}.")
    rank = int(rank)
    if rank < 1:
        raise InputError(f"rank must be at least 1, got {rank}.")
    if rank >= n_sites:
        raise InputError(f"rank must be smaller than the number of sites ({n_sites}), got {rank}; "
                         "lower the rank.")
    return rank


def _check_omega(omega, n_sites, tau1):
    if omega is None:
        if tau1 > 0:
            raise InputError(f"tau1 = {tau1} > 0 needs a penalty matrix omega (N x N); pass omega "
                             "(e.g. from xadapter.engine.penalty.build_penalty) or set tau1 = 0.")
        return None
    if sp.issparse(omega):
        omega = sp.csr_matrix(omega, dtype=np.float64)
        values = omega.data
        asymmetry = abs(omega - omega.T).max() if omega.nnz else 0.0
    else:
        omega = np.asarray(omega, dtype=np.float64)
        values = omega
        asymmetry = None
    if omega.ndim != 2 or omega.shape != (n_sites, n_sites):
        raise InputError(f"omega must be a square ({n_sites}, {n_sites}) matrix matching the "
                         f"{n_sites} sites of the data, got shape {omega.shape}.")
    if not np.isfinite(values).all():
        raise InputError("omega contains NaN or infinite values.")
    if asymmetry is None:
        asymmetry = float(np.max(np.abs(omega - omega.T)))
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    if asymmetry > 1e-8 * max(scale, np.finfo(float).tiny):
        raise InputError("omega must be symmetric; symmetrise it, e.g. (omega + omega.T) / 2.")
    return omega


def _check_init(init, n_sites, rank):
    if init is None:
        return None
    init = np.asarray(init, dtype=np.float64)
    if init.shape != (n_sites, rank):
        raise InputError(f"init must have shape (N, rank) = ({n_sites}, {rank}), got {init.shape}.")
    if not np.isfinite(init).all():
        raise InputError("init contains NaN or infinite values.")
    return init


# --------------------------------------------------------------------------- tau2 == 0 solvers


def _start_vector(n, init, seed=0):
    """Deterministic Lanczos start vector, drawn into span(init) when one is given."""
    random = np.random.default_rng(seed).standard_normal(n)
    random /= np.linalg.norm(random)
    if init is None:
        return random
    # Weights decreasing along the columns so every column is represented; the small
    # random part keeps the start out of any exactly invariant subspace.
    weights = 1.0 / np.sqrt(np.arange(1, init.shape[1] + 1))
    start = init @ weights
    norm = np.linalg.norm(start)
    if not norm > 0:
        return random
    return start / norm + 1e-3 * random


def _lanczos(operator, n, rank, v0, tol, max_iter):
    """Top ``rank`` eigenvectors of a symmetric operator by ARPACK (``which="LA"``)."""
    linop = spla.LinearOperator((n, n), matvec=operator, matmat=operator, dtype=np.float64)
    ncv = min(n, max(2 * rank + 1, 20))
    for _ in range(2):
        try:
            _, vectors = spla.eigsh(linop, k=rank, which="LA", v0=v0, ncv=ncv, tol=tol, maxiter=max_iter)
            return vectors, True
        except spla.ArpackNoConvergence as error:
            partial = error.eigenvectors
            ncv = min(n, 2 * ncv)
    warn(f"the Lanczos eigensolver did not converge for all {rank} eigenvectors; "
                  "the basis is the best subspace found (raise max_iter or tol).", RuntimeWarning)
    filler = np.random.default_rng(1).standard_normal((n, rank - partial.shape[1]))
    return np.hstack([partial, filler]), False


def _top_dense(objective, rank):
    matrix = objective.dense()
    n = matrix.shape[0]
    _, vectors = sla.eigh(matrix, subset_by_index=[n - rank, n - 1], overwrite_a=True, driver="evx")
    return vectors, {"solver": "dense", "iterations": 0, "converged": True}


class _Counter:
    """Wraps a linear map and counts the vectors it is applied to."""

    def __init__(self, function):
        self.function = function
        self.n_applied = 0

    def __call__(self, v):
        self.n_applied += 1 if v.ndim == 1 else v.shape[1]
        return self.function(v)


def _top_dual(ops, rank, init, tol, max_iter):
    """Top eigenvectors of ``Dc^T Dc`` through the ``T x T`` matrix ``Dc Dc^T``."""
    n_times = ops.n_times
    v0 = _start_vector(n_times, None if init is None else ops.times(init))
    if n_times <= DUAL_GRAM_MAX_TIMES:
        gram = ops.gram_time()
        if n_times <= _SMALL_DENSE:
            _, u = sla.eigh(gram, subset_by_index=[n_times - rank, n_times - 1])
            info = {"solver": "dual-gram", "iterations": 0, "converged": True}
        else:
            counter = _Counter(lambda w: gram @ w)
            u, converged = _lanczos(counter, n_times, rank, v0, tol, max_iter)
            info = {"solver": "dual-gram", "iterations": counter.n_applied, "converged": converged}
    else:
        counter = _Counter(lambda w: ops.times(ops.rtimes(w)))
        u, converged = _lanczos(counter, n_times, rank, v0, tol, max_iter)
        info = {"solver": "dual-lanczos", "iterations": counter.n_applied, "converged": converged}
    # Phi = Dc^T U diag(s)^-1; the scaling is irrelevant because Rayleigh-Ritz follows.
    # Near-zero singular values (data of lower rank than asked) leave no direction to
    # recover; the caller then falls back to the primal problem.
    subspace = ops.rtimes(u)
    norms = np.linalg.norm(subspace, axis=0)
    if not norms.min() > 1e-6 * norms.max():
        return None, info
    return subspace, info


def _top_lanczos(objective, rank, init, tol, max_iter):
    n = objective.ops.n_sites
    start = objective.n_applied
    vectors, converged = _lanczos(objective, n, rank, _start_vector(n, init), tol, max_iter)
    return vectors, {"solver": "lanczos", "iterations": objective.n_applied - start, "converged": converged}


def _block_width(n_sites, rank):
    return min(n_sites - 1, 2 * rank + 10)


def _block_breaks_down(objective, rank):
    """Whether LOBPCG's search space (three blocks) exceeds the operator's range.

    Without a penalty ``Dc^T Dc`` has rank below ``T``; a record shorter than three
    blocks leaves LOBPCG's Gram matrices singular, and it stops early on wrong vectors
    (measured: T = 40, N = 14,000, K = 8: subspace distance 2.3 from the exact one).
    Lanczos, one vector per pass, has no such limit.
    """
    ops = objective.ops
    return not objective.penalised and ops.n_times - 1 < 3 * _block_width(ops.n_sites, rank)


def _top_block(objective, rank, init, tol, max_iter):
    """Top eigenvectors by LOBPCG on blocks: one pass over (dask) data per iteration.

    Lanczos applies the operator one vector at a time, a pass over the data each; the
    block method applies it to ``rank`` plus guard vectors per pass. Measured at
    N = 20,000, T = 500, K = 10 with a graph penalty: 33 passes with ``2 K + 10``
    vectors, 53 with ``K + 10``, against 287 single-vector passes of Lanczos.
    """
    n = objective.ops.n_sites
    width = _block_width(n, rank)
    start = np.random.default_rng(0).standard_normal((n, width))
    if init is not None:
        start[:, :rank] = init + 1e-3 * start[:, :rank]
    before = objective.n_applied
    # lobpcg's tolerance is an absolute residual norm that every vector must reach: tied
    # to the scale of the operator (its largest Rayleigh quotient on the start block),
    # or an absolute 1e-9 is never met on eigenvalues of 1e4-1e7 and the solver runs to
    # its iteration limit
    start = _orthonormalise(start)
    scale = float(np.max(np.abs(np.sum(start * objective(start), axis=0))))
    linop = spla.LinearOperator((n, n), matvec=objective, matmat=objective, dtype=np.float64)
    with warnings.catch_warnings():
        # lobpcg reports its own tolerance misses and near-dependent guard vectors
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", sla.LinAlgWarning)
        values, vectors = spla.lobpcg(linop, start, largest=True, tol=(tol or LAZY_BLOCK_TOL) * max(scale, 1e-300),
                                      maxiter=max_iter or LAZY_BLOCK_MAX_ITER)
    order = np.argsort(values)[::-1][:rank]
    info = {"solver": "block", "iterations": objective.n_applied - before, "converged": True}
    return vectors[:, order], info


def _rayleigh_ritz(objective, subspace):
    """Eigenvectors of ``A`` restricted to ``span(subspace)``, by decreasing eigenvalue."""
    q = _orthonormalise(subspace)
    projected = objective.ops.score_gram(q)
    if objective.penalised:
        projected -= q.T @ objective.penalty(q)
    projected = 0.5 * (projected + projected.T)
    eigenvalues, rotation = np.linalg.eigh(projected)
    order = np.argsort(eigenvalues)[::-1]
    rotation = rotation[:, order]
    return q @ rotation


# --------------------------------------------------------------------------- tau2 > 0: ADMM


class _ShiftedSolver:
    """Solves ``(rho I - A) X = B`` for the ADMM Phi-update, ``A = Dc^T Dc - tau1 Omega``.

    * small N: Cholesky factor of the dense matrix, computed once;
    * no penalty: Woodbury through the ``T x T`` matrix
      ``(rho I - Dc^T Dc)^-1 = (I + Dc^T (rho I - Dc Dc^T)^-1 Dc) / rho``;
    * otherwise: conjugate gradients on the operator, warm-started from the previous
      iterate. With ``rho = 4 lambda_max`` the matrix has condition number about
      ``(rho + tau1 ||Omega||) / (rho - lambda_max)``, below 2 with the default
      ``rho`` when ``tau1 ||Omega|| <= lambda_max``, so a few iterations reach
      rounding level.
    """

    def __init__(self, objective, rho, dense):
        self.objective = objective
        self.rho = float(rho)
        self.kind = None
        if dense:
            matrix = -objective.dense()
            matrix[np.diag_indices_from(matrix)] += self.rho
            self.factor = sla.cho_factor(matrix, overwrite_a=True)
            self.kind = "cholesky"
        elif not objective.penalised and objective.ops.n_times <= DUAL_GRAM_MAX_TIMES:
            small = -objective.ops.gram_time()
            small[np.diag_indices_from(small)] += self.rho
            self.factor = sla.cho_factor(small, overwrite_a=True)
            self.kind = "woodbury"
        else:
            self.kind = "cg"

    def _apply_shifted(self, x):
        return self.rho * x - self.objective(x)

    def solve(self, rhs, guess):
        if self.kind == "cholesky":
            return sla.cho_solve(self.factor, rhs)
        ops = self.objective.ops
        if self.kind == "woodbury":
            inner = sla.cho_solve(self.factor, ops.times(rhs))
            return (rhs + ops.rtimes(inner)) / self.rho
        return self._block_cg(rhs, guess)

    def _block_cg(self, rhs, guess, rtol=1e-12, max_iter=200):
        """Column-wise conjugate gradients, all columns advanced together."""
        x = guess.copy()
        residual = rhs - self._apply_shifted(x)
        direction = residual.copy()
        rr = np.sum(residual * residual, axis=0)
        target = (rtol * np.linalg.norm(rhs, axis=0)) ** 2
        for _ in range(max_iter):
            if np.all(rr <= target):
                break
            image = self._apply_shifted(direction)
            curvature = np.sum(direction * image, axis=0)
            step = np.where(rr > target, rr / np.where(curvature > 0, curvature, 1.0), 0.0)
            x += direction * step
            residual -= image * step
            rr_new = np.sum(residual * residual, axis=0)
            direction = residual + direction * (rr_new / np.where(rr > 0, rr, 1.0))
            rr = rr_new
        return x


def _masked_orthonormal(sparse, max_iter=500, tol=1e-12):
    """Orthonormal columns with (at least) the zero pattern of ``sparse``.

    Alternating projections between matrices with the support of ``sparse`` and the
    matrices with orthonormal columns (polar factor). Starting from the ADMM's sparse
    iterate, which is already orthonormal up to the primal residual, they converge
    to a nearby point of the intersection. Returns ``(basis, ok)``.
    """
    mask = sparse != 0
    if np.any(~mask.any(axis=0)):
        return sparse, False
    current = sparse
    for _ in range(max_iter):
        gram = current.T @ current
        np.fill_diagonal(gram, np.diag(gram) - 1.0)
        if _frobenius(gram) <= tol:
            return current, True
        current = _polar(current) * mask
    gram = current.T @ current - np.eye(current.shape[1])
    return current, bool(_frobenius(gram) <= 1e-8)


def _admm_sparse(objective, start, tau2, rho, tol, max_iter, dense):
    """SpatPCA's inner ADMM for ``max tr(Phi^T A Phi) - tau2 |Phi|_1, Phi^T Phi = I``.

    Scaled form, duals ``u1`` (sparsity split) and ``u2`` (orthogonality split):

        Phi = (rho I - A)^-1 (rho / 2) (R - u1 + C - u2)
        R   = soft(Phi + u1, tau2 / rho)
        C   = polar(Phi + u2)
        u1 += Phi - R;  u2 += Phi - C
    """
    n, rank = start.shape
    solver = _ShiftedSolver(objective, rho, dense)
    phi = start.copy()
    sparse = start.copy()
    orth = start.copy()
    u1 = np.zeros_like(start)
    # Start at the multiplier of the smooth problem: at a fixed point
    # u1 + u2 = (2 / rho) A Phi, and u1 carries only the sparsity part.
    u2 = (2.0 / rho) * objective(start)
    threshold = tau2 / rho
    scale = np.sqrt(2.0 * n * rank)
    converged = False
    primal = dual = np.inf
    iteration = 0
    for iteration in range(1, max_iter + 1):
        phi = solver.solve(0.5 * rho * (sparse - u1 + orth - u2), phi)
        sparse_old, orth_old = sparse, orth
        sparse = _soft_threshold(phi + u1, threshold)
        orth = _polar(phi + u2)
        gap_sparse = phi - sparse
        gap_orth = phi - orth
        u1 += gap_sparse
        u2 += gap_orth
        primal = np.sqrt(np.sum(gap_sparse**2) + np.sum(gap_orth**2))
        if not np.isfinite(primal):
            break
        dual = rho * np.sqrt(np.sum((sparse - sparse_old) ** 2) + np.sum((orth - orth_old) ** 2))
        eps_primal = tol * (1e-2 * scale + max(np.sqrt(2.0) * _frobenius(phi),
                                               np.sqrt(_frobenius(sparse) ** 2 + rank)))
        eps_dual = tol * (1e-2 * scale + rho * np.sqrt(_frobenius(u1) ** 2 + _frobenius(u2) ** 2))
        if primal <= eps_primal and dual <= eps_dual:
            converged = True
            break
    info = {"iterations": iteration, "converged": converged, "primal_residual": float(primal),
            "dual_residual": float(dual), "rho": float(rho), "linear_solver": solver.kind}
    if not np.isfinite(primal):
        warn(f"the sparse ADMM diverged with rho = {rho:g}; returning the starting basis. "
                      "Use a larger rho.", RuntimeWarning)
        info["orthonormalized_on_support"] = False
        return start, info
    basis, ok = _masked_orthonormal(sparse)
    if not ok:
        warn("the sparse basis could not be made orthonormal on its zero pattern "
                      "(tau2 too large, or the ADMM did not converge); returning the nearest "
                      "orthonormal matrix, which has fewer exact zeros.", RuntimeWarning)
        basis = _polar(sparse if np.all(np.any(sparse != 0, axis=0)) else orth)
    info["orthonormalized_on_support"] = ok
    return basis, info


# --------------------------------------------------------------------------- public API


def explained_variance(data, basis, center=True):
    """Variance of the data along each basis column, ``||Dc phi_k||^2 / T``.

    Parameters
    ----------
    data : array_like, shape (T, N)
        Residuals (numpy, or a dask array).
    basis : array_like, shape (N, K)
    center : bool
        Centre the data over time first (without copying it).

    Returns
    -------
    ndarray, shape (K,)
        In data units squared; the diagonal of ``Phi^T S Phi`` with
        ``S = Dc^T Dc / T``.
    """
    data = _check_data(data)
    basis = np.asarray(basis, dtype=np.float64)
    if basis.ndim != 2 or basis.shape[0] != data.shape[1]:
        raise InputError(f"basis must have shape (N, K) with N = {data.shape[1]}, got {basis.shape}.")
    scores = _CentredData(data, center).times(basis)
    return np.sum(scores * scores, axis=0) / data.shape[0]


def _canonical(objective, basis):
    """Order columns by decreasing ``||Dc phi||^2`` and make each largest entry positive."""
    variance = objective.ops.score_variance(basis)
    order = np.argsort(-variance, kind="stable")
    basis = basis[:, order]
    variance = variance[order]
    rows = np.argmax(np.abs(basis), axis=0)
    signs = np.where(basis[rows, np.arange(basis.shape[1])] < 0, -1.0, 1.0)
    basis = basis * signs
    quotient = variance - np.sum(basis * objective.penalty(basis), axis=0)
    return basis, variance, quotient


def solve_basis(data, rank, *, omega=None, tau1=0.0, tau2=0.0, init=None, center=True,
                method="auto", tol=None, max_iter=None, rho=None, return_info=False):
    """Smooth, sparse, orthonormal spatial basis of a residual matrix (the Phi-step).

    Solves ``max tr(Phi^T (Dc^T Dc - tau1 Omega) Phi) - tau2 |Phi|_1`` over
    ``Phi^T Phi = I``, ``Dc`` the time-centred data (DESIGN section 1).

    Parameters
    ----------
    data : array_like, shape (T, N), or DataOperator
        Residuals, time rows and space columns, no NaN. A dask array is used through
        products and slices only; a :class:`DataOperator` (already centred when its
        ``center`` is True) through its products.
    rank : int
        Number of columns ``K``, ``1 <= K < N``.
    omega : ndarray or scipy.sparse matrix, shape (N, N), optional
        Symmetric positive semi-definite smoothness penalty (e.g. from
        :func:`xadapter.engine.penalty.build_penalty`); needed when ``tau1 > 0``.
    tau1 : float, default 0
        Smoothness weight, in the units of ``Dc^T Dc`` (data units squared times time
        steps) per unit of ``Omega``.
    tau2 : float, default 0
        Sparsity weight (same units).
    init : array_like, shape (N, K), optional
        Warm start: a previous basis (for example at a neighbouring ``tau1``). Seeds the
        Lanczos start vector; starts the ADMM (``tau2 > 0``) instead of the ``tau2 = 0``
        solution.
    center : bool, default True
        Centre the data over time (computed without a centred copy).
    method : {"auto", "dense", "matrix-free"}
        ``tau2 == 0`` solver. ``"dense"`` forms the N x N matrix (refused above
        :data:`DENSE_MAX_SITES`); ``"matrix-free"`` never does: it works on the
        ``T x T`` dual when there is no active penalty and ``T < N``, and runs Lanczos
        on ``v -> Dc^T (Dc v) - tau1 Omega v`` otherwise. ``"auto"``: the dual when
        there is no active penalty and ``T < N``; else dense up to
        :data:`AUTO_DENSE_MAX_SITES` sites; else matrix-free. Also selects the
        ADMM's linear solver (dense Cholesky or matrix-free).
    tol : float, optional
        Eigensolver: ARPACK relative accuracy (default 0, machine precision).
        ADMM (``tau2 > 0``): relative tolerance of the primal/dual stopping rule
        (default ``1e-5``).
    max_iter : int, optional
        Eigensolver: ARPACK restarts (default ARPACK's). ADMM: iterations (default
        5000).
    rho : float, optional
        ADMM penalty parameter; default ``4 * max_k ||Dc phi_k||^2`` over the starting
        basis (SpatPCA uses ten times the largest eigenvalue of ``Dc^T Dc``, which
        converges the same way in about 2.5 times more iterations). It must exceed
        the largest eigenvalue of ``Dc^T Dc - tau1 Omega``, and should exceed twice
        it.
    return_info : bool
        Also return a dict describing the solve.

    Returns
    -------
    basis : ndarray, shape (N, K)
        Orthonormal columns, ordered by decreasing explained variance
        ``||Dc phi_k||^2``, each with its largest-magnitude entry positive.

        With ``tau2 > 0`` the ADMM's soft-thresholded iterate ``R`` carries the exact
        zeros but is orthonormal only up to the primal residual, and the orthogonal
        iterate ``C`` has no exact zeros. The returned basis is ``R`` made exactly
        orthonormal *on its own zero pattern* (alternating projections between that
        pattern and the orthonormal matrices, a perturbation of the size of the
        primal residual), so it keeps every exact zero of ``R`` and has orthonormal
        columns to rounding. Should that fail (a column thresholded to zero,
        ``tau2`` far too large), the polar factor of ``R`` is returned with a
        ``RuntimeWarning`` and ``info["orthonormalized_on_support"] = False``.
    info : dict
        Only with ``return_info``: ``solver`` (``"dense"``, ``"dual-gram"``,
        ``"dual-lanczos"``, ``"lanczos"``, or ``"admm"``), ``iterations`` (operator
        applications for Lanczos, counted per vector; ADMM iterations), ``converged``,
        ``eigenvalues`` (``phi_k^T (Dc^T Dc - tau1 Omega) phi_k`` per column: the
        eigenvalues when ``tau2 = 0``), ``explained_variance`` (``||Dc phi_k||^2``);
        with ``tau2 > 0`` also ``rho``, ``primal_residual``, ``dual_residual``,
        ``linear_solver``, ``zero_fraction``, ``start_solver``.

    Raises
    ------
    InputError
        NaN in the data, ``rank`` outside ``1..N-1``, negative weights, a penalty of
        the wrong shape or missing when ``tau1 > 0``, an unknown method.
    ProblemTooLargeError
        ``method="dense"`` above :data:`DENSE_MAX_SITES` sites.
    """
    if not isinstance(data, DataOperator):
        data = _check_data(data)
    n_times, n_sites = (data.n_times, data.n_sites) if isinstance(data, DataOperator) else data.shape
    if n_times < 2 and center:
        raise InputError(f"centring over time needs at least 2 time steps, got {n_times}.")
    rank = _check_rank(rank, n_sites)
    tau1 = nonnegative("tau1", tau1)
    tau2 = nonnegative("tau2", tau2)
    omega = _check_omega(omega, n_sites, tau1)
    init = _check_init(init, n_sites, rank)
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {METHODS}.")
    if tol is not None:
        tol = nonnegative("tol", tol)
    if max_iter is not None and (isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1):
        raise InputError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if rho is not None and not nonnegative("rho", rho) > 0:
        raise InputError(f"rho must be positive, got {rho}.")

    ops = data if isinstance(data, DataOperator) else _CentredData(data, center)
    objective = _Objective(ops, omega, tau1)
    dense = _use_dense(method, objective, n_sites)

    if tau2 > 0 and init is not None:
        start, start_info = _orthonormalise(init), {"solver": "init"}
    else:
        eigen_tol = 0.0 if (tol is None or tau2 > 0) else tol
        eigen_iter = None if tau2 > 0 else max_iter
        start, start_info = _smooth_basis(objective, rank, init, method, dense, eigen_tol, eigen_iter)

    if tau2 == 0:
        basis, info = start, start_info
    else:
        rho = _admm_rho(objective, start, rho, from_eigenvectors=init is None)
        basis, info = _admm_sparse(objective, start, tau2, rho,
                                   _ADMM_DEFAULT_TOL if tol is None else tol,
                                   _ADMM_DEFAULT_MAX_ITER if max_iter is None else int(max_iter), dense)
        info = {"solver": "admm", "start_solver": start_info["solver"], **info}

    basis, variance, quotient = _canonical(objective, basis)
    if not return_info:
        return basis
    info["eigenvalues"] = quotient
    info["explained_variance"] = variance
    if tau2 > 0:
        info["zero_fraction"] = float(np.mean(basis == 0))
    return basis, info


def _admm_rho(objective, start, rho, from_eigenvectors):
    """ADMM penalty: default ``4 max_k ||Dc phi_k||^2``; must exceed ``lambda_max(A)``.

    For the exact ``tau2 = 0`` start, ``||Dc phi_1||^2 >= phi_1^T A phi_1 = lambda_max(A)``
    so the default has a margin of 4. Otherwise ``lambda_max(A)`` is estimated by a
    short Lanczos run started from the first column.
    """
    variance = objective.ops.score_variance(start)
    top = float(variance.max())
    if rho is None and from_eigenvectors:
        return _RHO_FACTOR * top if top > 0 else 1.0
    n = start.shape[0]
    linop = spla.LinearOperator((n, n), matvec=objective, matmat=objective, dtype=np.float64)
    v0 = start[:, 0] + 1e-3 * _start_vector(n, None)
    largest = float(spla.eigsh(linop, k=1, which="LA", v0=v0, tol=1e-3, return_eigenvectors=False)[0])
    if rho is None:
        top = max(top, largest)
        return _RHO_FACTOR * top if top > 0 else 1.0
    if rho <= 1.01 * largest:
        raise InputError(f"rho = {rho:g} must exceed the largest eigenvalue of Dc^T Dc - tau1 Omega "
                         f"(about {largest:g}); leave rho=None for the default.")
    return float(rho)


def _use_dense(method, objective, n_sites):
    if method == "dense":
        if n_sites > DENSE_MAX_SITES:
            raise ProblemTooLargeError(
                f"method='dense' forms an N x N matrix: {n_sites} sites exceeds the limit of "
                f"{DENSE_MAX_SITES}; use method='matrix-free'.")
        return True
    if method == "matrix-free":
        return False
    if objective.ops.lazy:
        return n_sites <= LAZY_GRAM_MAX_SITES
    return n_sites <= AUTO_DENSE_MAX_SITES


def _smooth_basis(objective, rank, init, method, dense, tol, max_iter):
    """Exact top eigenvectors of ``A`` (the ``tau2 = 0`` solution)."""
    ops = objective.ops
    lazy = ops.lazy
    # the dual T x T Gram pairs every time chunk with every other: not on dask data
    dual = (not objective.penalised and ops.n_times < ops.n_sites and not lazy
            and rank <= ops.n_times - 1 - int(ops.center) and method != "dense")
    subspace = None
    if dual:
        subspace, info = _top_dual(ops, rank, init, tol, max_iter)
    if subspace is None and dense:
        subspace, info = _top_dense(objective, rank)
    elif subspace is None and lazy and not _block_breaks_down(objective, rank):
        subspace, info = _top_block(objective, rank, init, tol, max_iter)
    elif subspace is None:
        subspace, info = _top_lanczos(objective, rank, init, tol, max_iter)
    return _rayleigh_ritz(objective, subspace), info
