import numpy as np
import pytest

from xadapter.engine.basis import solve_basis, subspace_distance
from xadapter.exceptions import InputError
from xadapter.engine.selection import CVResult, select_penalty_cv

TAU1_GRID = [0.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7]


def second_difference_penalty(n):
    d = np.diff(np.eye(n), n=2, axis=0)
    omega = d.T @ d
    return omega / np.linalg.eigvalsh(omega)[-1]


def noisy_smooth_field(seed, n_times=40, n_sites=60, noise_sd=1.0, amplitudes=(3.0, 2.0)):
    """Two smooth orthonormal patterns on [0, 1] under strong white noise (T < N)."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 1.0, n_sites)
    truth = np.linalg.qr(np.stack([np.exp(-(((s - 0.3) / 0.12) ** 2)), np.sin(2 * np.pi * s)], 1))[0]
    scores = rng.standard_normal((n_times, 2)) * np.asarray(amplitudes)
    data = 5.0 + scores @ truth.T + noise_sd * rng.standard_normal((n_times, n_sites))
    return data, truth


def min_cosine(basis, truth):
    return np.linalg.svd(basis.T @ truth, compute_uv=False).min()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cv_picks_smoothing_and_recovers_truth_better(seed):
    data, truth = noisy_smooth_field(seed)
    omega = second_difference_penalty(data.shape[1])
    result = select_penalty_cv(data, 2, TAU1_GRID, omega=omega)
    unpenalised = solve_basis(data, 2)
    d_best, d_zero = subspace_distance(result.basis, truth), subspace_distance(unpenalised, truth)
    c_best, c_zero = min_cosine(result.basis, truth), min_cosine(unpenalised, truth)
    print(f"\nseed {seed}: chosen {result.best}, subspace distance {d_zero:.3f} (tau1=0) -> {d_best:.3f}, "
          f"min |cos| {c_zero:.3f} -> {c_best:.3f}")
    assert result.best["tau1"] > 0
    # an interior optimum: the grid is wide enough that both ends score worse
    assert 0 < result.best_index < len(TAU1_GRID) - 1
    assert d_best < 0.7 * d_zero
    assert c_best > c_zero + 0.1


def test_result_layout_and_fold_scores_match_a_direct_computation():
    data, _ = noisy_smooth_field(5, n_times=23)
    omega = second_difference_penalty(data.shape[1])
    result = select_penalty_cv(data, 2, [0.0, 1e4], omega=omega, tau2_grid=[0.0], n_folds=4, refit=False)
    assert isinstance(result, CVResult)
    assert result.scores.shape == (2, 4)
    assert result.grid == [{"rank": 2, "tau1": 0.0, "tau2": 0.0}, {"rank": 2, "tau1": 1e4, "tau2": 0.0}]
    assert result.folds == [(0, 6), (6, 12), (12, 18), (18, 23)]  # contiguous, covering all times
    np.testing.assert_allclose(result.mean, result.scores.mean(axis=1))
    np.testing.assert_allclose(result.std, result.scores.std(axis=1, ddof=1))
    assert result.best == result.grid[int(np.argmin(result.mean))]
    assert result.basis is None
    table = result.table
    assert set(table) == {"rank", "tau1", "tau2", "mean", "std"} and all(len(v) == 2 for v in table.values())

    # independent: fold 2 (times 12..17) at tau1 = 0 from the SVD of the centred training block
    train = np.concatenate([data[:12], data[18:]])
    mean = train.mean(axis=0)
    basis = np.linalg.svd(train - mean, full_matrices=False)[2][:2].T
    held = data[12:18] - mean
    error = held - held @ basis @ basis.T
    assert result.scores[0, 2] == pytest.approx(np.sum(error**2) / error.size, rel=1e-10)


def test_missing_entries_are_scored_on_observed_sites_only():
    data, _ = noisy_smooth_field(3, n_times=30)
    rng = np.random.default_rng(0)
    gappy = data.copy()
    gappy[rng.uniform(size=data.shape) < 0.1] = np.nan
    result = select_penalty_cv(gappy, 2, [0.0], omega=None, n_folds=3, refit=True)
    assert np.isfinite(result.scores).all() and np.isfinite(result.basis).all()

    # independent: fold 0 by per-row least squares on the observed sites
    from xadapter.engine.admm import fit_adapter

    fit = fit_adapter(gappy[10:], 2)
    total, count = 0.0, 0
    for row in gappy[:10] - fit.mean:
        seen = np.isfinite(row)
        coef = np.linalg.lstsq(fit.basis[seen], row[seen], rcond=None)[0]
        total += np.sum((row[seen] - fit.basis[seen] @ coef) ** 2)
        count += seen.sum()
    assert result.scores[0, 0] == pytest.approx(total / count, rel=1e-10)


def test_interpolation_score_chooses_the_rank():
    data, _ = noisy_smooth_field(1, n_times=120, noise_sd=0.5, amplitudes=(4.0, 3.0))
    ranks = [1, 2, 3, 5, 8]
    projection = select_penalty_cv(data, 2, [0.0], omega=None, rank_grid=ranks, refit=False)
    # nested eigenvectors: the projection score only improves with the rank
    assert np.all(np.diff(projection.mean) < 0)
    assert projection.best["rank"] == 8
    interpolation = select_penalty_cv(data, 2, [0.0], omega=None, rank_grid=ranks, score="interpolation",
                                      refit=False)
    assert interpolation.best["rank"] == 2


def test_one_standard_error_rule_prefers_the_smoother_model():
    data, _ = noisy_smooth_field(0)
    omega = second_difference_penalty(data.shape[1])
    minimum = select_penalty_cv(data, 2, TAU1_GRID, omega=omega, refit=False)
    one_se = select_penalty_cv(data, 2, TAU1_GRID, omega=omega, rule="one_se", refit=False)
    assert one_se.best["tau1"] >= minimum.best["tau1"]
    limit = minimum.mean.min() + minimum.std[minimum.best_index] / np.sqrt(5)
    assert one_se.mean[one_se.best_index] <= limit


def test_sparsity_grid_runs_with_warm_starts():
    data, truth = noisy_smooth_field(4, n_times=60, noise_sd=0.5)
    omega = second_difference_penalty(data.shape[1])
    result = select_penalty_cv(data, 2, [1e4], omega=omega, tau2_grid=[0.0, 1.0, 5.0], n_folds=3)
    assert result.scores.shape == (3, 3) and np.isfinite(result.scores).all()
    assert [p["tau2"] for p in result.grid] == [0.0, 1.0, 5.0]
    assert np.allclose(result.basis.T @ result.basis, np.eye(2), atol=1e-8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_folds": 1}, "n_folds must be an integer >= 2"),
        ({"n_folds": 41}, "too few for 41 folds"),
        ({"score": "crps"}, "unknown score"),
        ({"rule": "max"}, "unknown rule"),
        ({"tau1_grid": [-1.0]}, "finite values >= 0"),
        ({"tau2_grid": []}, "non-empty"),
        ({"rank_grid": [2, 60]}, "1 <= rank < number of sites"),
        ({"fit_options": {"tau1": 1.0}}, "cannot set 'tau1'"),
        ({"omega": None, "tau1_grid": [1.0]}, "needs a penalty matrix omega"),
    ],
)
def test_bad_arguments(kwargs, match):
    data, _ = noisy_smooth_field(0)
    arguments = {"tau1_grid": [0.0, 1.0], "omega": second_difference_penalty(60), **kwargs}
    tau1_grid = arguments.pop("tau1_grid")
    with pytest.raises(InputError, match=match):
        select_penalty_cv(data, 2, tau1_grid, **arguments)
