import sys
import warnings

import numpy as np
import pytest
import xarray as xr

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PathCollection, QuadMesh  # noqa: E402

from xadapter import SpatialAdapter, datasets, plot  # noqa: E402
from xadapter.exceptions import InputError, NotFittedError  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures(monkeypatch):
    def refuse_show(*args, **kwargs):
        raise AssertionError("plot functions must not call plt.show()")

    monkeypatch.setattr(plt, "show", refuse_show)
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def grid_field():
    return datasets.synthetic_field(40, grid=(8, 9), rank=3, seed=1)


@pytest.fixture(scope="module")
def grid_adapter(grid_field):
    # complete data, no trend: the exact solution, loop skipped
    return SpatialAdapter(rank=4).fit(grid_field["residual"])


@pytest.fixture(scope="module")
def station_field():
    return datasets.synthetic_field(40, n_stations=40, rank=3, missing=0.05, seed=2)


@pytest.fixture(scope="module")
def station_adapter(station_field):
    # missing values: the loop runs (the alternation, no trend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return SpatialAdapter(rank=4, fine_scale=None).fit(station_field["residual"])


def _artists(ax, kind):
    return [c for c in ax.collections if isinstance(c, kind)]


def _map_axes(fig, kind):
    return [ax for ax in fig.axes if _artists(ax, kind) and ax.get_label() != "<colorbar>"]


# ---------------------------------------------------------------------- basis maps
def test_basis_maps_grid_one_quadmesh_per_mode_with_the_basis_values(grid_adapter):
    fig = plot.basis_maps(grid_adapter)
    axes = _map_axes(fig, QuadMesh)
    basis = grid_adapter.basis
    assert len(axes) == basis.sizes["mode"] == 4
    for mode, ax in enumerate(axes):
        (mesh,) = _artists(ax, QuadMesh)
        expected = basis.sel(mode=mode).transpose("lat", "lon").values
        np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(expected.shape), expected)
        vmin, vmax = mesh.get_clim()
        assert vmin == -vmax
        assert vmax == pytest.approx(np.abs(expected).max())
        eigenvalue = float(grid_adapter.eigenvalues.sel(mode=mode))
        assert ax.get_title().startswith(f"mode {mode}")
        assert f"{eigenvalue:.3g}" in ax.get_title()
    # pcolormesh cell centres sit on the grid coordinates
    corners = mesh.get_coordinates()
    centres_x = 0.5 * (corners[0, :-1, 0] + corners[0, 1:, 0])
    np.testing.assert_allclose(centres_x, basis["lon"].values, atol=1e-9)


def test_basis_maps_stations_scatter_at_station_coordinates(station_adapter, station_field):
    fig = plot.basis_maps(station_adapter, modes=2)
    axes = _map_axes(fig, PathCollection)
    assert len(axes) == 2
    basis = station_adapter.basis
    for mode, ax in enumerate(axes):
        (points,) = _artists(ax, PathCollection)
        np.testing.assert_array_equal(points.get_array(), basis.sel(mode=mode).values)
        np.testing.assert_allclose(points.get_offsets(),
                                   np.column_stack([station_field["lon"].values, station_field["lat"].values]))
        vmin, vmax = points.get_clim()
        assert vmin == -vmax == pytest.approx(-np.abs(basis.sel(mode=mode).values).max())


def test_basis_maps_rotated_draws_basis_times_rotation(station_adapter):
    state = station_adapter.state
    loadings = state["basis"].values @ state["rotation"].values
    fig = plot.basis_maps(station_adapter, modes=[1, 3], rotated=True)
    for ax, mode in zip(_map_axes(fig, PathCollection), [1, 3]):
        drawn = np.asarray(_artists(ax, PathCollection)[0].get_array())
        column = loadings[:, mode]
        column = column * np.sign(column[np.abs(column).argmax()])
        np.testing.assert_allclose(drawn, column, atol=1e-12)


def test_basis_maps_accepts_a_basis_dataarray_and_given_axes(grid_adapter):
    fig, axes = plt.subplots(1, 2)
    out = plot.basis_maps(grid_adapter.basis, modes=[0, 2], axes=axes, colorbar=False)
    assert out is fig
    assert [ax.get_title() for ax in axes] == ["mode 0", "mode 2"]


def test_basis_maps_rejects_unknown_modes_and_wrong_axes(grid_adapter):
    with pytest.raises(InputError, match="not modes"):
        plot.basis_maps(grid_adapter, modes=[7])
    _, axes = plt.subplots(1, 3)
    with pytest.raises(InputError, match="one Axes per mode"):
        plot.basis_maps(grid_adapter, modes=[0, 1], axes=axes)


def test_unfitted_adapter_raises_not_fitted():
    with pytest.raises(NotFittedError):
        plot.basis_maps(SpatialAdapter())


# ---------------------------------------------------------------------- field maps
def _grid(lat, lon, values, **attrs):
    return xr.DataArray(values, dims=("lat", "lon"), coords={"lat": lat, "lon": lon}, attrs=attrs)


def test_field_map_transposed_grid_lands_in_the_right_cells():
    lat, lon = np.array([10.0, 11.0, 12.0]), np.array([20.0, 21.0, 22.0, 23.0])
    values = np.arange(12.0).reshape(3, 4) + 1.0
    field = _grid(lat, lon, values, units="DU", long_name="ozone").transpose("lon", "lat")
    ax = plot.field_map(field)
    (mesh,) = _artists(ax, QuadMesh)
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(3, 4), values)
    # all positive: sequential map, data limits, colour bar from the attributes
    assert mesh.get_clim() == (1.0, 12.0)
    assert mesh.get_cmap().name == "viridis"
    assert ax.figure.axes[-1].get_ylabel() == "ozone [DU]"


def test_field_map_across_the_dateline_is_drawn_in_one_piece():
    lat = np.array([0.0, 1.0])
    lon = np.array([170.0, 175.0, 180.0, -175.0, -170.0])
    values = np.arange(10.0).reshape(2, 5) - 4.5
    ax = plot.field_map(_grid(lat, lon, values))
    (mesh,) = _artists(ax, QuadMesh)
    edges = mesh.get_coordinates()[0, :, 0]
    np.testing.assert_allclose(edges, [167.5, 172.5, 177.5, 182.5, 187.5, 192.5])
    # column order follows the input (already west to east): values unchanged
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(2, 5), values)
    vmin, vmax = mesh.get_clim()
    assert vmin == -vmax == -4.5


def test_field_map_unsorted_longitudes_are_sorted_with_their_values():
    lat = np.array([0.0, 1.0])
    lon = np.array([5.0, -5.0, 0.0])
    values = np.array([[3.0, 1.0, 2.0], [6.0, 4.0, 5.0]])
    ax = plot.field_map(_grid(lat, lon, values))
    (mesh,) = _artists(ax, QuadMesh)
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(2, 3), [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def test_field_map_stations_projected_xy_and_size_one_dims():
    rng = np.random.default_rng(0)
    x, y, values = rng.uniform(0, 1e5, 15), rng.uniform(0, 1e5, 15), rng.normal(size=(1, 15))
    field = xr.DataArray(values, dims=("time", "station"),
                         coords={"x": ("station", x, {"units": "m"}), "y": ("station", y, {"units": "m"})})
    ax = plot.field_map(field, colorbar=False)
    (points,) = _artists(ax, PathCollection)
    np.testing.assert_allclose(points.get_offsets(), np.column_stack([x, y]))
    np.testing.assert_array_equal(points.get_array(), values[0])
    assert ax.get_xlabel() == "x (m)"


def test_field_map_refuses_extra_dims_and_missing_coordinates():
    field = xr.DataArray(np.zeros((3, 2, 2)), dims=("time", "lat", "lon"),
                         coords={"lat": [0.0, 1.0], "lon": [0.0, 1.0]})
    with pytest.raises(InputError, match="select other dims"):
        plot.field_map(field)
    with pytest.raises(InputError, match="no lat/lon or x/y"):
        plot.field_map(xr.DataArray(np.zeros(4), dims="station"))


def test_kriging_maps_grid_mean_and_variance_with_units(grid_adapter, grid_field):
    observed = grid_field["residual"].isel(time=slice(0, 3)).copy()
    observed[:, 2:5, 3:6] = np.nan
    result = grid_adapter.krige(observed)
    when = result["time"].values[1]
    fig = plot.kriging_maps(result, time=when)
    mean_ax, variance_ax = _map_axes(fig, QuadMesh)
    for ax, name in ((mean_ax, "mean"), (variance_ax, "variance")):
        expected = result[name].sel(time=when).transpose("lat", "lon").values
        (mesh,) = _artists(ax, QuadMesh)
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert any(label.endswith("[K]") for label in labels)
    assert any(label.endswith("[K^2]") for label in labels)
    assert "2000-01-02" in fig._suptitle.get_text()


def test_kriging_maps_stations_with_sites_overlay(station_adapter, station_field):
    result = station_adapter.krige(station_field["residual"].isel(time=slice(0, 2)))
    fig = plot.kriging_maps(result, sites=station_field)
    axes = _map_axes(fig, PathCollection)
    assert len(axes) == 2
    for ax, name in zip(axes, ("mean", "variance")):
        data, overlay = _artists(ax, PathCollection)
        np.testing.assert_allclose(data.get_array(), result[name].isel(time=0).values)
        assert len(overlay.get_offsets()) == station_field.sizes["station"]


def test_kriging_maps_needs_a_kriging_result(grid_field):
    with pytest.raises(InputError, match="krige"):
        plot.kriging_maps(grid_field)


# ---------------------------------------------------------------------- diagnostics
def test_convergence_skipped_loop_shows_a_note(grid_adapter):
    ax = plot.convergence(grid_adapter)
    assert not ax.lines
    assert any("skipped" in text.get_text() for text in ax.texts)


def test_convergence_plots_the_history(station_adapter):
    ax = plot.convergence(station_adapter)
    state = station_adapter.state
    assert not state.attrs["skipped_loop"]
    assert len(ax.lines) == 3
    assert ax.get_yscale() == "log"
    for line, key in zip(ax.lines, ("primal_residual", "dual_residual", "basis_change")):
        values = state[f"history_{key}"].values
        np.testing.assert_array_equal(line.get_xdata(), state["history_iteration"].values)
        np.testing.assert_array_equal(line.get_ydata(), np.where(values > 0, values, np.nan))


def test_eigenvalue_spectrum_sample_and_thresholded(grid_adapter):
    ax = plot.eigenvalue_spectrum(grid_adapter)
    state = grid_adapter.state
    sample, kept, thresholded = ax.lines[0], ax.lines[1], state["eigenvalues"].values
    np.testing.assert_allclose(sample.get_ydata(), state["sample_eigenvalues"].values)
    np.testing.assert_allclose(kept.get_ydata(), thresholded[thresholded > 0])
    np.testing.assert_array_equal(kept.get_xdata(), np.flatnonzero(thresholded > 0))
    noise_line = ax.lines[2]
    assert noise_line.get_ydata()[0] == pytest.approx(float(state["low_rank_noise_variance"]))
    assert f"effective rank {grid_adapter.effective_rank} of 4" in ax.get_title()


def test_calibration_plot_coverage_by_distance(grid_adapter):
    ax = plot.calibration_plot(grid_adapter)
    calibration = grid_adapter.calibration
    model, calibrated, nominal = ax.lines[:3]
    np.testing.assert_array_equal(model.get_xdata(), calibration["distance"].values)
    np.testing.assert_array_equal(model.get_ydata(), calibration["coverage_model"].values)
    np.testing.assert_array_equal(calibrated.get_ydata(), calibration["coverage_calibrated"].values)
    assert np.all(np.asarray(nominal.get_ydata()) == 0.9)


def test_calibration_plot_without_site_cv_says_how_to_get_it(grid_field):
    adapter = SpatialAdapter(rank=3, site_folds=None, fine_scale=None).fit(grid_field["residual"])
    with pytest.raises(InputError, match="site_folds"):
        plot.calibration_plot(adapter)
    with pytest.raises(InputError, match="rank='auto'"):
        plot.selection_plot(adapter)


def test_selection_plot_crps_against_rank(station_field):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        adapter = SpatialAdapter(rank="auto", fine_scale=None).fit(station_field["residual"])
    ax = plot.selection_plot(adapter)
    selection = adapter.selection
    crps, rank = selection["crps"].values, selection["rank"].values
    (line,) = [line for line in ax.lines if line.get_label().startswith("$\\tau_1$")]
    order = np.argsort(rank)
    np.testing.assert_array_equal(line.get_xdata(), rank[order])
    np.testing.assert_array_equal(line.get_ydata(), crps[order])
    (star,) = [line for line in ax.lines if line.get_label() == "chosen"]
    assert star.get_ydata()[0] == crps.min()
    assert star.get_xdata()[0] == rank[np.argmin(crps)]
    # the chosen rank caps the spectral rule's rank of the fit on all times (the time
    # blocks of the search may keep more components than that fit does)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = SpatialAdapter(rank=adapter.eigenvalues.size, fine_scale=None, site_folds=None) \
            .fit(station_field["residual"])
    assert adapter.effective_rank == min(rank[np.argmin(crps)], full.effective_rank)


def test_selection_plot_crps_against_tau1(station_field):
    adapter = SpatialAdapter(rank=3, tau1="cv", fine_scale=None, cv_max_times=20).fit(station_field["residual"])
    ax = plot.selection_plot(adapter)
    tau1 = adapter.selection["tau1"].values
    assert len(ax.get_xticks()) == len(np.unique(tau1)) == len(tau1)
    (line,) = [line for line in ax.lines if line.get_label() == "candidates"]
    np.testing.assert_array_equal(line.get_ydata(), adapter.selection["crps"].values[np.argsort(tau1)])


def test_missing_matplotlib_names_the_fix(monkeypatch, grid_adapter):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        plot.basis_maps(grid_adapter)


def test_sites_overlay_uses_the_longitude_range_of_the_map():
    lat, lon = np.array([30.0, 35.0, 40.0]), np.array([-110.0, -100.0, -90.0])
    mean = _grid(lat, lon, np.ones((3, 3)), units="K").expand_dims(time=[0])
    result = xr.Dataset({"mean": mean, "variance": mean})
    # the same stations written in the 0..360 convention
    sites = xr.Dataset(coords={"lat": ("station", [32.0, 38.0]), "lon": ("station", [255.0, 265.0])})
    fig = plot.kriging_maps(result, sites=sites)
    for ax in _map_axes(fig, QuadMesh):
        (overlay,) = _artists(ax, PathCollection)
        np.testing.assert_allclose(overlay.get_offsets(), [[-105.0, 32.0], [-95.0, 38.0]])


def test_field_map_curvilinear_grid_uses_the_2d_coordinates():
    j, i = np.meshgrid(np.arange(3.0), np.arange(4.0), indexing="ij")
    lat, lon = 10.0 + j + 0.1 * i, -50.0 + i
    field = xr.DataArray(j * 4 + i, dims=("y", "x"),
                         coords={"lat": (("y", "x"), lat), "lon": (("y", "x"), lon)})
    # dims and coordinates in another order than each other
    transposed = field.transpose("x", "y").assign_coords(lat=(("y", "x"), lat), lon=(("y", "x"), lon))
    ax = plot.field_map(transposed, colorbar=False)
    (mesh,) = _artists(ax, QuadMesh)
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(3, 4), field.values)
    # cell centres on the 2-D coordinates: corner means of interior cells
    corners = mesh.get_coordinates()
    centre = 0.25 * (corners[1, 1] + corners[1, 2] + corners[2, 1] + corners[2, 2])
    np.testing.assert_allclose(centre, [lon[1, 1], lat[1, 1]])
