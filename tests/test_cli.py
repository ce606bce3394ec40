"""The ``xadapter`` command, run in-process through :func:`xadapter.cli.main`.

What the command writes must be what the library computes with the same
parameters (fit, kriging at fitted sites, at target stations and on a grid, with and
without dask chunks and a distributed scheduler); user mistakes must end in one
``error:`` line, exit status 2 and no output file.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xadapter
from xadapter import SpatialAdapter, datasets
from xadapter.cli import build_parser, main
from xadapter.engine.basis import subspace_distance

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


def test_krige_with_a_trend_takes_covariates_from_observed_and_target_files(files):
    adapter_path, out = files["folder"] / "trend_for_krige.nc", files["folder"] / "kriged_trend.nc"
    assert main(["fit", str(files["input"]), "obs", "--prediction", "pred", "--covariates", "elev",
                 *FIT_OPTIONS, "-o", str(adapter_path)]) == 0
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


# ---------------------------------------------------------------------- info and plot
def test_info_prints_summary_parameters_and_tables(files, capsys):
    path = files["folder"] / "calibrated.nc"
    assert main(["fit", str(files["input"]), "resid", "--rank", "3", "--site-folds", "3", "-q",
                 "-o", str(path)]) == 0
    status, stdout, stderr = _run(["info", path], capsys)
    assert status == 0 and stderr == ""
    adapter = xadapter.load(path)
    assert repr(adapter) in stdout
    assert f"xadapter version: {xadapter.__version__}" in stdout
    assert adapter.state.attrs["created"] in stdout
    assert "site_folds" in stdout and "fine_neighbors" in stdout
    assert "selection (rank / smoothness search):\n  none" in stdout
    header = next(line for line in stdout.splitlines() if "coverage_model" in line)
    assert header.split() == ["distance", "coverage_model", "coverage_calibrated", "count"]
    n_bins = adapter.calibration.sizes["distance_bin"]
    rows = stdout.split(header)[1].splitlines()[1:n_bins + 1]
    assert all(len(row) == len(header) for row in rows)  # aligned columns


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


def test_output_folder_is_checked_before_fitting(files, capsys):
    status, _, stderr = _run(["fit", files["input"], "resid", "-o", files["folder"] / "no" / "a.nc"], capsys)
    assert status == 2 and "does not exist" in stderr


# ---------------------------------------------------------------------- help and entry point
def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["fit", "krige", "info", "plot", "demo"])
def test_help_documents_every_option(command, capsys):
    status, stdout, _ = _run([command, "--help"], capsys)
    assert status == 0
    for action in _subcommands()[command]._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        for text in action.option_strings or [action.metavar or action.dest]:
            assert text in stdout


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
    for name in ("fit", "krige", "info", "plot", "demo"):
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
