"""Cross-validation over sites (xadapter.engine.validation) against direct computations."""

import numpy as np
import pytest
from scipy.stats import norm

from xadapter.engine import validation as val
from xadapter.exceptions import InputError
from xadapter.engine.finescale import FineScaleParams, krige_with_fine_scale
from xadapter.engine.fitted import FittedModel
from xadapter.engine.sites import Sites
from xadapter.engine.kriging import krige
from xadapter.engine.metrics import crps_gaussian

Q90 = norm.ppf(0.95)


def site_model(basis, rotation, eigenvalues, mean, noise_variance, planar, fine=None, fine_neighbors=30,
               extension=None):
    """A fitted model on planar sites (km) with the given arrays."""
    return FittedModel(basis=basis, scores=np.zeros((1, basis.shape[1])), mean=mean, rotation=rotation,
                       eigenvalues=eigenvalues, sample_eigenvalues=eigenvalues,
                       low_rank_noise_variance=noise_variance, fine=fine, sites=Sites(False, xy_km=planar),
                       fine_neighbors=fine_neighbors, extension=extension or {})


# ------------------------------------------------------------------------------- fixtures


def linear_model(fine=None, smoothing=0.0, n_sites=60, seed=0):
    """A fitted model whose basis columns and mean are linear in the planar coordinates.

    A thin-plate spline (smoothed or not) reproduces linear functions exactly, so the
    basis and mean re-extended to held-out sites equal their true rows.
    """
    rng = np.random.default_rng(seed)
    planar = rng.uniform(0.0, 800.0, (n_sites, 2))
    design = np.column_stack([np.ones(n_sites), planar / 800.0])
    basis, _ = np.linalg.qr(design)  # orthonormal columns, still linear in x, y
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    mean = 2.0 + 0.004 * planar[:, 0] - 0.002 * planar[:, 1]
    model = site_model(basis, rotation, np.array([30.0, 8.0, 0.0]), mean, 0.6, planar, fine=fine,
                       fine_neighbors=12, extension={"method": "global", "neighbors": 50, "smoothing": smoothing})
    loadings = basis @ rotation
    scores = rng.standard_normal((25, 3)) * np.sqrt([30.0, 8.0, 0.5])
    data = mean + scores @ loadings.T + 0.8 * rng.standard_normal((25, n_sites))
    data[rng.random(data.shape) < 0.15] = np.nan
    return model, data


# ------------------------------------------------------------------------------ site_folds


@pytest.mark.parametrize("n_sites, n_folds", [(10, 2), (23, 5), (100, 7), (5, 5)])
def test_site_folds_partition_all_sites(n_sites, n_folds):
    folds = val.site_folds(n_sites, n_folds, seed=3)
    assert len(folds) == n_folds
    together = np.concatenate(folds)
    assert together.size == n_sites
    np.testing.assert_array_equal(np.sort(together), np.arange(n_sites))
    sizes = [fold.size for fold in folds]
    assert max(sizes) - min(sizes) <= 1
    for fold in folds:
        np.testing.assert_array_equal(fold, np.sort(fold))
    # deterministic for a seed, different for another
    again = val.site_folds(n_sites, n_folds, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    if n_sites > n_folds:
        other = val.site_folds(n_sites, n_folds, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(folds, other))


@pytest.mark.parametrize("n_folds", [1, 0, 11])
def test_site_folds_refuses_bad_fold_counts(n_folds):
    with pytest.raises(InputError, match="n_folds"):
        val.site_folds(10, n_folds)


# -------------------------------------------------------------------------- krige_held_out


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_held_out_kriging_with_exact_extension_equals_direct_kriging(smoothing):
    model, data = linear_model(smoothing=smoothing)
    held = np.array([3, 10, 17, 40, 41, 59])
    kept = np.setdiff1d(np.arange(data.shape[1]), held)
    mean, variance = val.krige_held_out(model, data, kept, held)

    loadings = model.basis @ model.rotation
    direct = krige(data[:, kept], loadings[kept], model.eigenvalues, model.noise_variance,
                   target_loadings=loadings[held], mean=model.mean[kept], target_mean=model.mean[held])
    np.testing.assert_allclose(mean, direct.mean, rtol=0, atol=1e-8)
    np.testing.assert_allclose(variance, direct.variance, rtol=0, atol=1e-8)
    # the held-out data never enter: changing them changes nothing
    scrambled = data.copy()
    scrambled[:, held] = 1e3
    again, _ = val.krige_held_out(model, scrambled, kept, held)
    np.testing.assert_array_equal(again, mean)


def test_held_out_kriging_latent_variance_drops_the_noise():
    model, data = linear_model()
    held, kept = np.arange(0, 60, 6), np.setdiff1d(np.arange(60), np.arange(0, 60, 6))
    _, with_noise = val.krige_held_out(model, data, kept, held, include_noise=True)
    _, latent = val.krige_held_out(model, data, kept, held, include_noise=False)
    np.testing.assert_allclose(with_noise - latent, model.noise_variance, atol=1e-10)


def test_held_out_kriging_with_fine_scale_equals_direct_fine_scale_kriging():
    fine = FineScaleParams("exponential", partial_sill=0.7, range_km=120.0, nugget=0.3)
    model, data = linear_model(fine=fine, smoothing=0.3)
    held = np.array([0, 5, 22, 33, 47])
    kept = np.setdiff1d(np.arange(data.shape[1]), held)
    mean, variance = val.krige_held_out(model, data, kept, held)
    loadings = model.basis @ model.rotation
    direct_mean, direct_var = krige_with_fine_scale(
        data[:, kept], loadings[kept], model.eigenvalues, fine, model.planar[kept],
        target_loadings=loadings[held], target_coords=model.planar[held], mean=model.mean[kept],
        target_mean=model.mean[held], k=model.fine_neighbors)
    np.testing.assert_allclose(mean, direct_mean, rtol=0, atol=1e-8)
    np.testing.assert_allclose(variance, direct_var, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------ cross_validate


def test_cross_validation_equals_a_direct_loop():
    model, data = linear_model(seed=2)
    folds = val.site_folds(data.shape[1], 4, seed=1)
    times = np.array([0, 3, 4, 10, 24])
    cv = val.cross_validate_sites(model, data, folds, times=times)

    sub = data[times]
    prediction, variance = np.full(sub.shape, np.nan), np.full(sub.shape, np.nan)
    distance = np.empty(sub.shape[1])
    for held in folds:
        kept = np.setdiff1d(np.arange(sub.shape[1]), held)
        prediction[:, held], variance[:, held] = val.krige_held_out(model, sub, kept, held)
        for site in held:
            distance[site] = np.min(np.linalg.norm(model.planar[kept] - model.planar[site], axis=1))
    seen = ~np.isnan(sub)
    expected_se = np.array([np.sum((sub[seen[:, i], i] - prediction[seen[:, i], i]) ** 2)
                            for i in range(sub.shape[1])])
    expected_var = np.array([np.sum(variance[seen[:, i], i]) for i in range(sub.shape[1])])
    np.testing.assert_allclose(cv.squared_error, expected_se, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cv.model_variance, expected_var, rtol=1e-12)
    np.testing.assert_array_equal(cv.count, seen.sum(axis=0))
    np.testing.assert_allclose(cv.distance_km, distance, rtol=1e-12)
    error = sub[seen] - prediction[seen]
    assert cv.rmse == pytest.approx(np.sqrt(np.mean(error**2)), rel=1e-12)
    z = error / np.sqrt(variance[seen])
    assert cv.coverage == pytest.approx(np.mean(np.abs(z) <= Q90), rel=1e-12)
    assert cv.crps == pytest.approx(crps_gaussian(sub[seen], prediction[seen], variance[seen]), rel=1e-12)
    np.testing.assert_allclose(cv.z_scores[seen], z, rtol=1e-12)
    assert np.isnan(cv.z_scores[~seen]).all()


def test_cross_validation_over_all_times_by_default():
    model, data = linear_model(seed=5)
    folds = val.site_folds(data.shape[1], 3, seed=0)
    every = val.cross_validate_sites(model, data, folds)
    explicit = val.cross_validate_sites(model, data, folds, times=np.arange(data.shape[0]))
    np.testing.assert_array_equal(every.squared_error, explicit.squared_error)
    assert every.z_scores.shape == data.shape


def test_evenly_spaced_times():
    assert val.evenly_spaced_times(50, None) is None
    assert val.evenly_spaced_times(50, 80) is None
    times = val.evenly_spaced_times(300, 200)
    assert times[0] == 0 and times[-1] == 299
    assert times.size == 200 and np.all(np.diff(times) > 0)


# ---------------------------------------------------------------------- variance ratios


def test_variance_ratio_equals_a_hand_computation():
    rng = np.random.default_rng(7)
    sites = rng.uniform(0, 100, (30, 2))
    targets = rng.uniform(0, 100, (6, 2))
    squared_error = rng.uniform(1, 5, 30)
    model_variance = rng.uniform(1, 2, 30)
    count = rng.integers(5, 15, 30)
    ratio = val.variance_ratio_at(targets, sites, squared_error, model_variance, count,
                                  neighbours=4, prior_count=10.0)
    pooled = squared_error.sum() / model_variance.sum()
    dispersion = val.ratio_overdispersion(sites, squared_error, model_variance, count, neighbours=4)
    for target, got in zip(targets, ratio):
        nearest = np.argsort(np.linalg.norm(sites - target, axis=1))[:4]
        raw = squared_error[nearest].sum() / model_variance[nearest].sum()
        n = count[nearest].sum() / dispersion
        assert got == pytest.approx(pooled * (n * raw / pooled + 10.0) / (n + 10.0), rel=1e-12)


def test_overdispersion_by_hand_and_at_least_one():
    rng = np.random.default_rng(3)
    sites = rng.uniform(0, 100, (12, 2))
    squared_error = rng.uniform(1, 9, 12)
    model_variance = rng.uniform(1, 2, 12)
    count = np.full(12, 40)
    got = val.ratio_overdispersion(sites, squared_error, model_variance, count, neighbours=3)
    terms = []
    for i, site in enumerate(sites):
        others = np.argsort(np.linalg.norm(sites - site, axis=1))[1:4]
        local = squared_error[others].sum() / model_variance[others].sum()
        terms.append(40 * (squared_error[i] / model_variance[i] - local) ** 2 / (2 * local**2))
    assert got == pytest.approx(max(1.0, np.mean(terms)), rel=1e-12)
    # every site with the same ratio: no scatter, the floor
    assert val.ratio_overdispersion(sites, 2.0 * model_variance, model_variance, count) == 1.0


def test_variance_ratio_tends_to_the_network_scale_with_few_counts_and_to_the_local_ratio_with_many():
    sites = np.column_stack([np.arange(20.0), np.zeros(20)])
    squared_error = np.where(np.arange(20) < 10, 1.0, 9.0)  # network-wide ratio 5
    target = np.array([[0.0, 0.0]])
    ratios = [val.variance_ratio_at(target, sites, squared_error, np.ones(20), np.full(20, c),
                                    neighbours=5, prior_count=20.0)[0] for c in (0, 1, 10, 1e3, 1e6)]
    assert ratios[0] == pytest.approx(5.0)
    assert np.all(np.diff(ratios) <= 0)  # monotone from the network scale towards the local 1
    # the jump between the halves counts as scatter at the sites next to it, so the
    # effective counts stop growing with the counts: most of the way, not all of it
    assert ratios[-1] < 1.5
    # more neighbours than sites: all of them, the network scale
    all_sites = val.variance_ratio_at(target, sites, squared_error, np.ones(20), np.full(20, 1e6), neighbours=50)
    assert all_sites[0] == pytest.approx(5.0, rel=1e-6)
    # no model variance, or no error at all: ratio 1, never a division by zero
    for error, variance in ((squared_error, np.zeros(20)), (np.zeros(20), np.ones(20))):
        assert val.variance_ratio_at(target, sites, error, variance, np.full(20, 10), neighbours=2)[0] == 1.0


def test_variance_ratio_is_local_when_the_ratio_varies_smoothly():
    sites = np.column_stack([np.arange(40.0), np.zeros(40)])
    squared_error = 1.0 + 8.0 * np.arange(40) / 39.0  # from 1 to 9 along the line
    ratio = val.variance_ratio_at(np.array([[0.0, 0.0], [39.0, 0.0]]), sites, squared_error,
                                  np.ones(40), np.full(40, 1e4), neighbours=5)
    local = [squared_error[:5].mean(), squared_error[-5:].mean()]
    np.testing.assert_allclose(ratio, local, rtol=5e-2)  # network-wide ratio: 5


def test_variance_ratio_leans_on_the_network_when_site_ratios_scatter():
    """Persistent site errors: ratios that jump from site to site are one draw per site."""
    rng = np.random.default_rng(0)
    sites = rng.uniform(0, 100, (60, 2))
    model_variance = np.full(60, 100.0)
    squared_error = model_variance * 2.0 * rng.chisquare(1, 60)  # one draw per site, mean ratio 2
    ratio = val.variance_ratio_at(sites[:5] + 1.0, sites, squared_error, model_variance, np.full(60, 100))
    pooled = squared_error.sum() / model_variance.sum()
    local = [squared_error[np.argsort(np.linalg.norm(sites - t, axis=1))[:8]].sum() / 800.0 for t in sites[:5] + 1.0]
    # much closer to the network-wide ratio than the raw neighbourhood ratios are
    assert np.abs(ratio - pooled).mean() < 0.5 * np.abs(np.array(local) - pooled).mean()


# ------------------------------------------------------------------ coverage by distance


def synthetic_cv(n_times=40, n_sites=25, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_times, n_sites)) * np.linspace(0.5, 2.0, n_sites)
    z[rng.random(z.shape) < 0.2] = np.nan
    return val.SiteCV(squared_error=np.zeros(n_sites), model_variance=np.zeros(n_sites),
                      count=np.sum(~np.isnan(z), axis=0), crps=0.0, rmse=0.0, coverage=0.0,
                      distance_km=rng.uniform(10, 300, n_sites), z_scores=z)


def test_coverage_by_distance_counts_add_up_and_match_direct_counts():
    cv = synthetic_cv()
    ratios = np.linspace(0.5, 4.0, cv.z_scores.shape[1])
    report = val.coverage_by_distance(cv, ratios, n_bins=4)
    valid = ~np.isnan(cv.z_scores)
    assert report["count"].sum() == valid.sum()
    assert len(report["distance_km"]) == len(report["count"]) == 4
    assert report["distance_km"][-1] == pytest.approx(cv.distance_km.max())
    # each bin against a direct count over its sites
    edges = np.concatenate([[cv.distance_km.min()], report["distance_km"]])
    inside = np.abs(cv.z_scores) <= Q90
    inside_cal = np.abs(cv.z_scores) <= Q90 * np.sqrt(ratios)
    for b in range(4):
        low, high = edges[b], edges[b + 1]
        cols = (cv.distance_km >= low) & ((cv.distance_km < high) if b < 3 else (cv.distance_km <= high))
        mask = valid[:, cols]
        assert report["count"][b] == mask.sum()
        assert report["coverage_model"][b] == pytest.approx(inside[:, cols][mask].mean())
        assert report["coverage_calibrated"][b] == pytest.approx(inside_cal[:, cols][mask].mean())
    # pooled over bins, the coverage is that of every valid entry
    pooled = np.sum(report["coverage_model"] * report["count"]) / report["count"].sum()
    assert pooled == pytest.approx(inside[valid].mean())
    # without ratios: no calibrated coverage
    assert np.isnan(val.coverage_by_distance(cv)["coverage_calibrated"]).all()


def test_coverage_by_distance_when_every_site_is_equally_far():
    # a regular grid: every held-out site has a kept neighbour at the same spacing
    cv = synthetic_cv()
    cv.distance_km[:] = 250.0
    report = val.coverage_by_distance(cv, np.ones(cv.z_scores.shape[1]))
    valid = ~np.isnan(cv.z_scores)
    assert report["count"].sum() == valid.sum()
    np.testing.assert_allclose(report["distance_km"], [250.0])
    assert report["coverage_model"][0] == pytest.approx(np.mean(np.abs(cv.z_scores[valid]) <= Q90))
    np.testing.assert_allclose(report["coverage_calibrated"], report["coverage_model"])


def test_site_model_cross_validation_is_calibrated_when_the_model_is_true():
    """Data drawn from the model itself, exact extension: z-scores are standard normal."""
    rng = np.random.default_rng(11)
    n_sites, n_times = 200, 150
    planar = rng.uniform(0.0, 1000.0, (n_sites, 2))
    basis, _ = np.linalg.qr(np.column_stack([np.ones(n_sites), planar / 1000.0]))
    model = site_model(basis, np.eye(3), np.array([20.0, 5.0, 1.0]), np.zeros(n_sites), 0.5, planar,
                       extension={"method": "global", "smoothing": 0.0})
    scores = rng.standard_normal((n_times, 3)) * np.sqrt([20.0, 5.0, 1.0])
    data = scores @ basis.T + np.sqrt(0.5) * rng.standard_normal((n_times, n_sites))
    cv = val.cross_validate_sites(model, data, val.site_folds(n_sites, 5))
    # measured over seeds 11-14: coverage 0.898-0.902, ratio 0.998-1.010
    assert cv.coverage == pytest.approx(0.9, abs=0.01)
    ratio = cv.squared_error.sum() / cv.model_variance.sum()
    assert ratio == pytest.approx(1.0, abs=0.03)


def test_precomputed_fold_extensions_give_the_same_cross_validation():
    fine = FineScaleParams("exponential", partial_sill=0.5, range_km=100.0, nugget=0.4)
    model, data = linear_model(fine=fine, smoothing=0.3, seed=4)
    folds = val.site_folds(data.shape[1], 5, seed=2)
    everything = np.arange(data.shape[1])
    extensions = [val.extend_to_held_out(model, np.setdiff1d(everything, held), held) for held in folds]
    for (basis, mean), held in zip(extensions, folds):  # linear truth: the extension is exact
        np.testing.assert_allclose(basis, model.basis[held], atol=1e-9)
        np.testing.assert_allclose(mean, model.mean[held], atol=1e-9)
    direct = val.cross_validate_sites(model, data, folds)
    reused = val.cross_validate_sites(model, data, folds, extensions=extensions)
    np.testing.assert_array_equal(reused.squared_error, direct.squared_error)
    np.testing.assert_array_equal(reused.z_scores, direct.z_scores)
    assert reused.crps == direct.crps
