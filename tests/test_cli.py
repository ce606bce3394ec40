"""The ``xadapter`` command, run in-process through :func:`xadapter.cli.main`.

What the command writes must be what the library computes with the same
parameters (fit, kriging at fitted sites, at target stations and on a grid, with and
without dask chunks and a distributed scheduler); user mistakes must end in one
``error:`` line, exit status 2 and no output file.
"""

import argparse
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import xadapter
from xadapter import SpatialAdapter, cli, datasets
from xadapter.cli import build_parser, main
from xadapter.engine.basis import subspace_distance
from xadapter.engine.settings import Settings
from xadapter.labelled.state import FORMAT_VERSION

#: Fast settings shared by the command and the in-process reference fits.
FIT_OPTIONS = ["--rank", "3", "--site-folds", "0", "--quiet"]
FIT_PARAMS = dict(rank=3, site_folds=0, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Station residuals with a prediction and a covariate, and target stations elsewhere."""
    folder = tmp_path_factory.mktemp("cli")
    field = datasets.synthetic_field(n_times=60, n_stations=40, seed=3)
    rng = np.random.default_rng(4)
    elevation = xr.DataArray(rng.standard_normal(40), dims="station", coords={"station": field["station"]})
    residual = field["residual"] + 0.7 * elevation
    ds = xr.Dataset({
        "resid": field["residual"],
        "obs": (residual + 280.0).assign_attrs(units="K"),
        "pred": xr.full_like(residual, 280.0).assign_attrs(units="K"),
        "elev": elevation,
    })
    ds.to_netcdf(folder / "input.nc")
    # target stations numbered after the fitted ones, so their covariates can be
    # concatenated with the observed stations' along one station dim
    targets = xr.Dataset(
        {"elev": ("station", rng.standard_normal(6))},
        coords={"station": np.arange(100, 106),
                "lat": ("station", rng.uniform(32, 43, 6), {"units": "degrees_north", "long_name": "station latitude"}),
                "lon": ("station", rng.uniform(-108, -92, 6), {"units": "degrees_east"})},
    )
    targets.to_netcdf(folder / "targets.nc")
    return {"folder": folder, "input": folder / "input.nc", "targets": folder / "targets.nc", "data": ds,
            "target_data": targets}


@pytest.fixture(scope="module")
def adapter_file(files):
    path = files["folder"] / "adapter.nc"
    assert main(["fit", str(files["input"]), "resid", *FIT_OPTIONS, "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def trend_adapter_file(files):
    """An adapter of ``obs - pred`` with a residual trend on ``elev``."""
    path = files["folder"] / "trend_for_krige.nc"
    assert main(["fit", str(files["input"]), "obs", "--prediction", "pred", "--covariates", "elev",
                 *FIT_OPTIONS, "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def rank_auto_fit(tmp_path_factory):
    """``xadapter fit --rank auto`` on a 20-step field on a 4 x 5 lat/lon grid.

    Returns the adapter file and the ``(category, message)`` of every warning the
    command reported. On so few steps and sites the candidate ranks above the
    identifiable one have infinite noise edges, which once met a trailing variance of
    0 and made numpy warn about ``0 * inf``.
    """
    folder = tmp_path_factory.mktemp("rank_auto")
    rng = np.random.default_rng(5)
    lat, lon = np.arange(30.0, 38.0, 2.0), np.arange(-100.0, -90.0, 2.0)
    pattern = np.cos((lon[None, :] + 100.0) / 4.0) * np.ones((lat.size, 1))  # one smooth mode
    values = 3.0 * rng.standard_normal((20, 1, 1)) * pattern + rng.standard_normal((20, lat.size, lon.size))
    field = xr.DataArray(values, dims=("time", "lat", "lon"),
                         coords={"time": pd.date_range("2000-01-01", periods=20, freq="D"), "lat": lat, "lon": lon})
    field.to_dataset(name="var").to_netcdf(folder / "small.nc")
    path = folder / "adapter.nc"
    reported = []

    def record(message, category, filename, lineno, file=None, line=None):
        reported.append((category, str(message)))

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(cli, "_show_warning", record)
        warnings.simplefilter("always")  # a warning seen earlier in the session must show again
        assert main(["fit", str(folder / "small.nc"), "var", "--rank", "auto", "-q", "-o", str(path)]) == 0
    return path, reported


def _assert_same_fit(fitted, reference, tol=1e-10):
    rank = reference.state.sizes["mode"]
    assert subspace_distance(fitted.basis.values.reshape(-1, rank), reference.basis.values.reshape(-1, rank)) < tol
    np.testing.assert_allclose(fitted.eigenvalues.values, reference.eigenvalues.values, rtol=tol, atol=tol)
    np.testing.assert_allclose(fitted.mean.values, reference.mean.values, rtol=tol, atol=tol)
    assert fitted.noise_variance == pytest.approx(reference.noise_variance, rel=tol)
    assert fitted.effective_rank == reference.effective_rank


def _assert_same_kriging(written, expected, tol=1e-10):
    for name in ("mean", "variance", "lower", "upper"):
        xr.testing.assert_allclose(written[name].reset_coords(drop=True), expected[name].reset_coords(drop=True),
                                   rtol=tol, atol=tol)


def _run(argv, capsys):
    """Exit status, stdout and stderr of one in-process run."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------- fit
def test_fit_writes_the_adapter_the_library_fits(files, adapter_file):
    saved = xadapter.load(adapter_file)
    reference = SpatialAdapter(**FIT_PARAMS).fit(files["data"]["resid"])
    _assert_same_fit(saved, reference)
    assert saved.rank == 3 and saved.site_folds == 0


def test_fit_prediction_and_covariates_use_the_dataset_accessor(files, capsys):
    out = files["folder"] / "trend.nc"
    status, stdout, _ = _run(["fit", files["input"], "obs", "--prediction", "pred", "--covariates", "elev",
                              "--rank", "3", "--site-folds", "0", "--fine-scale", "none", "--seed", "2",
                              "--max-iter", "50", "--tol", "1e-5", "-o", out], capsys)
    assert status == 0
    assert "<SpatialAdapter" in stdout and str(out) in stdout  # the summary without --quiet
    saved = xadapter.load(out)
    reference = files["data"].sadapter.fit(target="obs", prediction="pred", covariates=["elev"], rank=3,
                                           site_folds=0, fine_scale=None, seed=2, max_iter=50, tol=1e-5,
                                           progress=False)
    _assert_same_fit(saved, reference, tol=1e-8)
    np.testing.assert_allclose(saved.trend_coefficients.values, reference.trend_coefficients.values, rtol=1e-8)
    assert saved.fine_scale is None and saved.max_iter == 50 and saved.tol == 1e-5 and saved.seed == 2


def test_fit_in_time_chunks_gives_the_same_adapter(files, adapter_file):
    out = files["folder"] / "chunked.nc"
    assert main(["fit", str(files["input"]), "resid", *FIT_OPTIONS, "--chunks", "time=20",
                 "--output", str(out)]) == 0
    _assert_same_fit(xadapter.load(out), xadapter.load(adapter_file), tol=1e-8)


def test_scheduler_address_of_a_distributed_cluster(files, adapter_file):
    distributed = pytest.importorskip("distributed")
    out = files["folder"] / "distributed.nc"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                                  silence_logs=50) as cluster:
        status = main(["fit", str(files["input"]), "resid", *FIT_OPTIONS, "--chunks", "time=20",
                       "--scheduler", cluster.scheduler_address, "-o", str(out)])
    assert status == 0
    _assert_same_fit(xadapter.load(out), xadapter.load(adapter_file), tol=1e-8)


# ---------------------------------------------------------------------- krige
def test_krige_fills_the_fitted_sites_like_the_library(files, adapter_file):
    out = files["folder"] / "kriged_sites.nc"
    assert main(["krige", str(adapter_file), "--observed", str(files["input"]), "--var", "resid",
                 "--level", "0.8", "-q", "-o", str(out)]) == 0
    expected = xadapter.load(adapter_file).krige(files["data"]["resid"], level=0.8)
    with xr.open_dataset(out) as written:
        _assert_same_kriging(written, expected)
        assert written.attrs["level"] == 0.8
        assert written["mean"].attrs["units"] == "K" and written["variance"].attrs["units"] == "K^2"
        assert written["lat"].attrs["units"] == "degrees_north"
        assert "xadapter krige" in written.attrs["history"]


def test_krige_in_time_chunks_and_on_a_scheduler_gives_the_same_values(files, adapter_file):
    plain, chunked = files["folder"] / "plain.nc", files["folder"] / "chunked_kriged.nc"
    common = ["krige", str(adapter_file), "--observed", str(files["input"]), "--var", "resid", "--no-noise", "-q"]
    assert main([*common, "-o", str(plain)]) == 0
    assert main([*common, "--chunks", "time=7", "--scheduler", "synchronous", "-o", str(chunked)]) == 0
    expected = xadapter.load(adapter_file).krige(files["data"]["resid"], include_noise=False)
    with xr.open_dataset(plain) as a, xr.open_dataset(chunked) as b:
        _assert_same_kriging(a, expected)
        _assert_same_kriging(b, a)
        assert b.attrs["include_noise"] == 0


def test_krige_at_target_stations(files, adapter_file):
    out = files["folder"] / "kriged_at.nc"
    assert main(["krige", str(adapter_file), "--observed", str(files["input"]), "--var", "resid",
                 "--at", str(files["targets"]), "-q", "-o", str(out)]) == 0
    expected = xadapter.load(adapter_file).krige(files["data"]["resid"], at=files["target_data"])
    with xr.open_dataset(out) as written:
        _assert_same_kriging(written, expected)
        np.testing.assert_array_equal(written["station"].values, np.arange(100, 106))
        # the target file's coordinate attributes survive, with CF standard names added
        assert written["lat"].attrs["long_name"] == "station latitude"
        assert written["lat"].attrs["standard_name"] == "latitude"
        assert written["lon"].attrs["units"] == "degrees_east"


def test_krige_with_a_trend_takes_covariates_from_observed_and_target_files(files, trend_adapter_file):
    adapter_path, out = trend_adapter_file, files["folder"] / "kriged_trend.nc"
    assert main(["krige", str(adapter_path), "--observed", str(files["input"]), "--var", "obs",
                 "--prediction", "pred", "--covariates", "elev", "--at", str(files["targets"]), "-q",
                 "-o", str(out)]) == 0
    data, targets = files["data"], files["target_data"]
    covariates = xr.concat([data["elev"], targets["elev"]], dim="station").expand_dims(feature=["elev"])
    expected = xadapter.load(adapter_path).krige(data.sadapter.residual("obs", "pred"), at=targets,
                                                 covariates=covariates)
    with xr.open_dataset(out) as written:
        _assert_same_kriging(written, expected)


def test_krige_on_a_grid_has_cf_lat_lon(files, adapter_file):
    out = files["folder"] / "kriged_grid.nc"
    assert main(["krige", str(adapter_file), "--observed", str(files["input"]), "--var", "resid",
                 "--grid", "31:44:1.5,-108:-92:4", "-q", "-o", str(out)]) == 0
    grid = xr.Dataset(coords={"lat": np.arange(31, 44.01, 1.5), "lon": np.arange(-108, -91.99, 4.0)})
    expected = xadapter.load(adapter_file).krige(files["data"]["resid"], at=grid)
    with xr.open_dataset(out) as written:
        assert written["mean"].dims == ("time", "lat", "lon")
        np.testing.assert_allclose(written["lat"].values, grid["lat"].values)  # 44 on the grid: included
        np.testing.assert_allclose(written["lon"].values, [-108, -104, -100, -96, -92])
        _assert_same_kriging(written, expected)
        assert written["lat"].attrs["units"] == "degrees_north"
        assert written["lat"].attrs["standard_name"] == "latitude"
        assert written["lon"].attrs["units"] == "degrees_east"
        assert written["lon"].attrs["standard_name"] == "longitude"


@pytest.mark.parametrize("trend, options, message", [
    # a trend adapter without --covariates: the command's options, not the model's keywords
    (True, [], "this adapter has a residual trend on ['elev']: give --covariates elev (variables of"),
    (True, ["--at", "{targets}"], "and the same variables in {targets}"),
    (True, ["--covariates", "elev", "--grid", "31:44:1.5,-108:-92:4"], "--grid cannot be used with"),
    (True, ["--grid", "31:44:1.5,-108:-92:4"], "give the targets as --at TARGETS.nc with the variables elev"),
    (False, ["--covariates", "elev"], "has no residual trend"),
])
def test_krige_trend_options_must_match_the_adapter(files, adapter_file, trend_adapter_file, tmp_path, capsys,
                                                    trend, options, message):
    variable = ["--var", "obs", "--prediction", "pred"] if trend else ["--var", "resid"]
    options = [option.format(targets=files["targets"]) for option in options]
    out = tmp_path / "kriged.nc"
    status, stdout, stderr = _run(["krige", trend_adapter_file if trend else adapter_file, "--observed",
                                   files["input"], *variable, *options, "-q", "-o", out], capsys)
    assert status == 2
    assert stderr.startswith("error:") and stderr.count("\n") == 1, stderr
    assert message.format(targets=files["targets"]) in stderr
    assert "covariates=" not in stderr and "Traceback" not in stderr + stdout
    assert not out.exists()


def test_krige_help_says_a_grid_cannot_take_a_trend(capsys):
    _, stdout, _ = _run(["krige", "--help"], capsys)
    grid_help = " ".join(stdout.split("--grid LAT0:LAT1:DLAT,LON0:LON1:DLON")[-1].split("--level")[0].split())
    assert "not for an adapter with a residual trend" in grid_help


def test_kriged_and_forecast_files_are_cf_1_8(files, adapter_file):
    kriged, forecast = files["folder"] / "kriged_cf.nc", files["folder"] / "forecast_cf.nc"
    assert main(["krige", str(adapter_file), "--observed", str(files["input"]), "--var", "resid",
                 "--grid", "31:44:1.5,-108:-92:4", "-q", "-o", str(kriged)]) == 0
    assert main(["forecast", str(adapter_file), "--steps", "2", "-q", "-o", str(forecast)]) == 0
    for path in (kriged, forecast):
        with xr.open_dataset(path) as written:
            assert written.attrs["Conventions"] == "CF-1.8"
            assert written["time"].attrs["standard_name"] == "time"
            assert written["time"].attrs["axis"] == "T"
            assert np.issubdtype(written["time"].dtype, np.datetime64)  # written with CF units "since"
            assert written["lat"].attrs["standard_name"] == "latitude"


# ---------------------------------------------------------------------- info and plot
def test_info_prints_summary_parameters_and_tables(files, capsys):
    path = files["folder"] / "calibrated.nc"
    assert main(["fit", str(files["input"]), "resid", "--rank", "3", "--site-folds", "3", "-q",
                 "-o", str(path)]) == 0
    status, stdout, stderr = _run(["info", path], capsys)
    assert status == 0 and stderr == ""
    adapter = xadapter.load(path)
    assert repr(adapter) in stdout
    assert re.search(r"effective rank: (\d+)", stdout).group(1) == str(adapter.effective_rank)
    assert f"file format: {FORMAT_VERSION}" in stdout
    assert f"xadapter version: {xadapter.__version__}" in stdout
    assert adapter.state.attrs["created"] in stdout
    assert "site_folds" in stdout and "fine_neighbors" in stdout
    assert "selection (rank / smoothness search):\n  none" in stdout
    header = next(line for line in stdout.splitlines() if "coverage_model" in line)
    assert header.split() == ["distance", "coverage_model", "coverage_calibrated", "count"]
    n_bins = adapter.calibration.sizes["distance_bin"]
    rows = stdout.split(header)[1].splitlines()[1:n_bins + 1]
    assert all(len(row) == len(header) for row in rows)  # aligned columns


def test_info_of_a_rank_auto_adapter_prints_the_selection_table(rank_auto_fit, capsys):
    path, _ = rank_auto_fit
    status, stdout, stderr = _run(["info", path], capsys)
    assert status == 0 and stderr == ""
    adapter = xadapter.load(path)
    assert re.search(r"effective rank: (\d+)", stdout).group(1) == str(adapter.effective_rank)
    table = stdout.split("selection (rank / smoothness search):\n")[1].split("\n\n")[0].splitlines()
    assert table[0].split() == ["tau1", "rank", "crps", "rmse", "coverage"]
    rows = [line.split() for line in table[1:]]
    assert len(rows) == adapter.selection.sizes[next(iter(adapter.selection.dims))] > 1
    assert [int(row[1]) for row in rows] == adapter.selection["rank"].values.tolist()


def test_info_quiet_only_checks_the_file(files, adapter_file, capsys):
    assert _run(["info", "-q", adapter_file], capsys) == (0, "", "")
    status, stdout, stderr = _run(["info", "--quiet", files["input"]], capsys)
    assert status == 2 and stdout == "" and "not an xadapter file" in stderr


def test_rank_auto_fit_on_a_small_grid_emits_no_numpy_warning(rank_auto_fit):
    _, reported = rank_auto_fit
    # numpy's floating-point warnings read "invalid value encountered in multiply" and the like
    numpy_warnings = [message for category, message in reported
                      if issubclass(category, RuntimeWarning) and " encountered in " in message]
    assert numpy_warnings == []


def test_plot_writes_png_maps(files, adapter_file, capsys):
    pytest.importorskip("matplotlib")
    kriged, out = files["folder"] / "kriged_for_plot.nc", files["folder"] / "plots"
    assert main(["krige", str(adapter_file), "--observed", str(files["input"]), "--var", "resid",
                 "--grid", "31:44:1,-108:-92:1", "-q", "-o", str(kriged)]) == 0
    status, stdout, _ = _run(["plot", adapter_file, kriged, "--out", out, "--modes", "2"], capsys)
    assert status == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == ["basis.png", "kriged_map.png"]  # no calibration: fitted with --site-folds 0
    for path in out.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(path) in stdout


def test_plot_without_matplotlib_names_the_extra(adapter_file, tmp_path, capsys, monkeypatch):
    from xadapter import plot

    def missing():
        raise ImportError("no matplotlib")

    monkeypatch.setattr(plot, "_pyplot", missing)
    status, _, stderr = _run(["plot", adapter_file, "--out", tmp_path / "plots"], capsys)
    assert status == 2
    assert stderr.startswith("error:") and "pip install matplotlib" in stderr
    assert not (tmp_path / "plots").exists()


# ---------------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("argv, message", [
    (["fit", "{folder}/missing.nc", "resid"], "no such file"),
    (["fit", "{input}", "nope"], "'nope' is not a variable of"),
    (["fit", "{input}", "obs", "--prediction", "nope"], "prediction 'nope'"),
    (["fit", "{input}", "resid", "--rank", "0"], "--rank"),
    (["fit", "{input}", "resid", "--tau1", "-1"], "--tau1"),
    (["fit", "{input}", "resid", "--chunks", "tim=5"], "no dim 'tim'"),
    (["fit", "{input}", "resid", "--site-folds", "1"], "site_folds"),  # an XAdapterError of the model
    (["fit", "{input}", "resid", "--scheduler", "nonsense://nowhere"], "--scheduler"),
    (["krige", "{input}", "--observed", "{input}", "--var", "resid"], "not an xadapter file"),
    (["krige", "{adapter}", "--observed", "{input}", "--var", "resid", "--grid", "30:45,0:1:1"], "--grid"),
    (["krige", "{adapter}", "--observed", "{input}", "--var", "resid", "--grid", "30:20:1,0:1:1"], "--grid"),
    (["krige", "{adapter}", "--observed", "{input}", "--var", "nope"], "'nope' is not a variable of"),
    (["krige", "{adapter}", "--observed", "{input}", "--var", "resid", "--level", "90"], "--level"),
    (["info", "{input}"], "not an xadapter file"),
    (["info", "/etc/hostname"], "not NetCDF"),
])
def test_user_mistakes_are_one_error_line(files, adapter_file, tmp_path, capsys, argv, message):
    out = tmp_path / "out.nc"
    names = {"folder": files["folder"], "input": files["input"], "adapter": adapter_file}
    argv = [a.format(**names) for a in argv]
    if argv[0] in ("fit", "krige"):
        argv += ["-q", "-o", str(out)]
    status, stdout, stderr = _run(argv, capsys)
    assert status == 2
    assert stderr.startswith("error:") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert "Traceback" not in stderr + stdout
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_a_scheduler_address_that_fails_leaves_dask_as_it_was(files, capsys):
    """A failed connection leaves no default client behind (a Client that cannot parse its
    address registers itself anyway), so later dask work in the process runs as before."""
    distributed = pytest.importorskip("distributed")
    import dask

    before = dask.config.get("scheduler", None)
    status, _, stderr = _run(["fit", files["input"], "resid", "--scheduler", "nonsense://nowhere", "-q",
                              "-o", files["folder"] / "never.nc"], capsys)
    assert status == 2 and "--scheduler" in stderr
    with pytest.raises(ValueError):
        distributed.default_client()
    assert dask.config.get("scheduler", None) == before
    assert float(xr.DataArray(np.arange(4.0)).chunk(2).sum().compute()) == 6.0


def test_output_folder_is_checked_before_fitting(files, capsys):
    status, _, stderr = _run(["fit", files["input"], "resid", "-o", files["folder"] / "no" / "a.nc"], capsys)
    assert status == 2 and "does not exist" in stderr


# ---------------------------------------------------------------------- help and entry point
def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["fit", "krige", "forecast", "info", "plot", "demo"])
def test_help_documents_every_option(command, capsys):
    status, stdout, _ = _run([command, "--help"], capsys)
    assert status == 0
    for action in _subcommands()[command]._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        for text in action.option_strings or [action.metavar or action.dest]:
            assert text in stdout


@pytest.mark.parametrize("command", ["fit", "krige", "forecast", "info", "plot", "demo"])
def test_help_shows_each_default_once(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: the defaults of one option are on one line
    _, stdout, _ = _run([command, "--help"], capsys)
    for line in stdout.splitlines():
        assert len(re.findall(r"\(default", line)) <= 1, line
    if command == "fit":
        assert f"ADMM iteration limit (default: {Settings.max_iter})" in stdout


def test_output_aliases():
    parser = build_parser()
    assert parser.parse_args(["demo", "--output", "x"]).out == "x"
    assert parser.parse_args(["demo", "--out", "y"]).out == "y"
    assert parser.parse_args(["fit", "a.nc", "v", "--output", "z.nc"]).output == "z.nc"
    assert parser.parse_args(["krige", "a.nc", "--observed", "o.nc", "--var", "v", "-o", "k.nc"]).output == "k.nc"


def test_installed_entry_point_runs():
    script = Path(sys.executable).parent / "xadapter"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "xadapter.cli"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("fit", "krige", "forecast", "info", "plot", "demo"):
        assert name in done.stdout


def test_observed_that_does_not_match_the_adapter_is_one_error_line(files, adapter_file, tmp_path, capsys):
    """Observations on other stations, or without the fitted dims, are refused by name."""
    others = files["data"][["resid"]].assign_coords(station=files["data"]["station"].values + 1000)
    others.to_netcdf(tmp_path / "others.nc")
    cases = [
        (["--observed", str(tmp_path / "others.nc"), "--var", "resid"], "not fitted on"),
        (["--observed", str(files["targets"]), "--var", "elev"], "time"),
    ]
    for options, message in cases:
        out = tmp_path / "kriged.nc"
        status, stdout, stderr = _run(["krige", str(adapter_file), *options, "-q", "-o", str(out)], capsys)
        assert status == 2, stderr
        assert stderr.startswith("error:") and stderr.count("\n") == 1 and message in stderr, stderr
        assert "Traceback" not in stderr + stdout
        assert not out.exists()
