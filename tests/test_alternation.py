"""The fit without a trend: Anderson-accelerated alternation of the gap fill and the Phi-step."""

import dask.array as da
import numpy as np
import pytest

from xadapter.engine import alternation
from xadapter.engine.admm import conditional_fill, fit_adapter
from xadapter.engine.alternation import anderson_weights
from xadapter.engine.basis import solve_basis, subspace_distance

from test_admm import second_difference_penalty, smooth_field


@pytest.fixture(scope="module")
def gappy():
    data, truth = smooth_field(n_times=200, n_sites=60, seed=4)
    rng = np.random.default_rng(21)
    gappy = data.copy()
    gappy[rng.uniform(size=data.shape) < 0.25] = np.nan
    gappy[:100, 11] = np.nan  # a site missing for half of the time
    gappy[7] = np.nan  # a time with no observation
    return gappy, truth


def objective(filled, basis):
    centred = filled - filled.mean(axis=0)
    return float(np.sum(centred**2) - np.sum((centred @ basis) ** 2))


def test_anderson_weights_minimise_the_combined_step():
    rng = np.random.default_rng(0)
    steps = rng.standard_normal((5, 40))  # slots 0..4
    order = [3, 4, 0, 1]  # a ring buffer that wrapped: slot 1 is the newest
    weights = anderson_weights(steps @ steps.T, order)
    assert weights[2] == 0.0 and weights.sum() == pytest.approx(1.0, abs=1e-12)
    # the same combination from the vectors themselves: min ||f_k - dF gamma||
    f = steps[order]
    differences = np.diff(f, axis=0).T
    gamma = np.linalg.lstsq(differences, f[-1], rcond=None)[0]
    expected = np.zeros(5)
    expected[order[-1]] = 1.0
    expected[order] -= np.diff(np.eye(4), axis=0).T @ gamma
    np.testing.assert_allclose(weights, expected, atol=1e-10)
    # one step: the plain step
    np.testing.assert_array_equal(anderson_weights(steps @ steps.T, [2]), np.eye(5)[2])


def test_reaches_the_admm_fixed_point(gappy):
    data, _ = gappy
    alternated = fit_adapter(data, 3, tol_rel=1e-8, max_iter=2000)
    admm = fit_adapter(data, 3, tol_rel=1e-8, max_iter=2000, batch_size=data.shape[0])  # windows: the ADMM
    assert alternated.converged and admm.converged
    assert alternated.n_iter < admm.n_iter
    assert subspace_distance(alternated.basis, admm.basis) < 1e-5
    np.testing.assert_allclose(alternated.filled, admm.filled, atol=1e-5 * np.std(admm.filled))
    # stationary in the gaps: the exact fill under the returned basis moves nothing
    refilled = alternated.filled.copy()
    missing = np.isnan(data)
    conditional_fill(refilled, missing, alternated.mean, alternated.basis)
    np.testing.assert_allclose(refilled, alternated.filled, atol=1e-6 * np.std(admm.filled))
    # and the basis is the exact Phi-step of the filled field
    assert subspace_distance(alternated.basis, solve_basis(alternated.filled, 3)) < 1e-10


def test_objective_never_rises_and_mixing_saves_iterations(gappy, monkeypatch):
    data, truth = gappy
    fit = fit_adapter(data, 3, tol_rel=1e-7, max_iter=2000)
    assert np.all(np.diff(fit.history["objective"]) <= 1e-12 * fit.history["objective"][0])
    assert fit.history["primal_residual"][-1] < 1e-3 * fit.history["primal_residual"][0]
    monkeypatch.setattr(alternation, "ANDERSON_MEMORY", 0)  # plain alternation
    plain = fit_adapter(data, 3, tol_rel=1e-7, max_iter=2000)
    print(f"\nalternation to tol 1e-7: {fit.n_iter} iterations with Anderson mixing, {plain.n_iter} without")
    assert plain.converged and fit.n_iter < plain.n_iter
    assert subspace_distance(fit.basis, plain.basis) < 1e-4
    assert abs(objective(fit.filled, fit.basis) - objective(plain.filled, plain.basis)) < 1e-7 * objective(
        plain.filled, plain.basis)


def test_with_smoothness_penalty(gappy):
    data, truth = gappy
    omega = second_difference_penalty(data.shape[1])
    fit = fit_adapter(data, 3, omega=omega, tau1=5.0, tol_rel=1e-7, max_iter=2000)
    assert fit.converged
    assert np.all(np.diff(fit.history["objective"]) <= 1e-12 * fit.history["objective"][0])
    reference = fit_adapter(data, 3, omega=omega, tau1=5.0, tol_rel=1e-7, max_iter=2000, batch_size=200)
    assert subspace_distance(fit.basis, reference.basis) < 1e-4
    assert subspace_distance(fit.basis, solve_basis(fit.filled, 3, omega=omega, tau1=5.0)) < 1e-8


def test_dask_blocks_run_the_same_iterations(gappy):
    data, _ = gappy
    in_memory = fit_adapter(data, 3)
    blocks = fit_adapter(da.from_array(data, chunks=(70, -1)), 3)
    assert blocks.n_iter == in_memory.n_iter
    for key in ("primal_residual", "dual_residual", "basis_change"):
        np.testing.assert_allclose(blocks.history[key], in_memory.history[key], rtol=1e-6, atol=1e-12)
    assert subspace_distance(blocks.basis, in_memory.basis) < 1e-10
    np.testing.assert_allclose(np.asarray(blocks.filled), in_memory.filled, atol=1e-10)
    np.testing.assert_allclose(blocks.scores, in_memory.scores, atol=1e-8)
    # the input is never written
    assert np.isnan(data).sum() > 0 and np.isnan(data[7]).all()
