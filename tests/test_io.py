import os
import stat

import numpy as np
import pytest
import xarray as xr

from xadapter import io
from xadapter.exceptions import InputError


def test_atomic_write_leaves_no_file_on_failure(tmp_path, monkeypatch):
    ds = xr.Dataset({"a": ("x", np.arange(3.0))})
    target = tmp_path / "out.nc"

    def broken(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_to_netcdf(ds, target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.nc"
    first = xr.Dataset({"a": ("x", np.arange(3.0))})
    io.atomic_to_netcdf(first, target)
    original = target.read_bytes()

    def broken(self, path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_to_netcdf(first, target)
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["out.nc"]


def test_atomic_write_round_trip(tmp_path):
    ds = xr.Dataset({"a": (("t", "x"), np.random.default_rng(0).standard_normal((4, 3)))}, attrs={"k": "v"})
    io.atomic_to_netcdf(ds, tmp_path / "ok.nc")
    with xr.open_dataset(tmp_path / "ok.nc") as back:
        xr.testing.assert_identical(back.load(), ds)
    with pytest.raises(InputError, match="does not exist"):
        io.atomic_to_netcdf(ds, tmp_path / "missing" / "ok.nc")


def _weather2k_file(path, n_stations=5, n_times=30, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.standard_normal((n_stations, 23, n_times)).astype(np.float32)
    lat = rng.uniform(20, 50, n_stations)
    lon = rng.uniform(75, 130, n_stations)
    alt = rng.uniform(0, 3000, n_stations)
    array[:, 0, :] = lat[:, None]
    array[:, 1, :] = lon[:, None]
    array[:, 2, :] = alt[:, None]
    np.save(path, array)
    return array


@pytest.mark.parametrize("chunks", [None, "auto"])
def test_read_weather2k_layout(tmp_path, chunks):
    path = tmp_path / "weather2k.npy"
    array = _weather2k_file(path)
    ds = io.read_weather2k(path, variables=("t", "ws"), chunks=chunks)
    assert ds["t"].dims == ("time", "station")
    assert ds.sizes == {"time": 30, "station": 5}
    # air temperature is row 4, wind speed row 16 of the archive
    np.testing.assert_allclose(ds["t"].values, array[:, 4, :].T, rtol=1e-6)
    np.testing.assert_allclose(ds["ws"].values, array[:, 16, :].T, rtol=1e-6)
    np.testing.assert_allclose(ds["lat"].values, array[:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(ds["lon"].values, array[:, 1, 0], rtol=1e-6)
    assert ds["t"].attrs["units"] == "degC"
    assert ds["lat"].attrs["units"] == "degrees_north"
    assert (ds.time.values[1] - ds.time.values[0]) == np.timedelta64(1, "h")
    if chunks is not None:
        assert hasattr(ds["t"].data, "dask")


def test_read_weather2k_errors(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((3, 5, 4)))
    with pytest.raises(InputError, match="Weather2K"):
        io.read_weather2k(path)
    good = tmp_path / "good.npy"
    _weather2k_file(good)
    with pytest.raises(InputError, match="unknown Weather2K variables"):
        io.read_weather2k(good, variables=("temperature",))


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(value):
        os.umask(value)

    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    ds = xr.Dataset({"a": ("x", np.arange(3.0))})
    io.atomic_to_netcdf(ds, tmp_path / "new.nc")
    assert stat.S_IMODE(os.stat(tmp_path / "new.nc").st_mode) == expected
    # the same as a file created the ordinary way
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == expected


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "out.nc"
    ds = xr.Dataset({"a": ("x", np.arange(3.0))})
    io.atomic_to_netcdf(ds, target)
    os.chmod(target, 0o640)
    io.atomic_to_netcdf(ds, target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


@pytest.mark.parametrize("proc_status", [True, False])
def test_reading_the_umask_does_not_change_it(umask, monkeypatch, proc_status):
    from xadapter.io import netcdf

    if not proc_status:  # platforms without /proc: the set-and-restore fallback

        def no_proc(*args, **kwargs):
            raise FileNotFoundError("/proc/self/status")

        monkeypatch.setattr(netcdf, "open", no_proc, raising=False)
    umask(0o027)
    assert netcdf._current_umask() == 0o027
    assert os.umask(0o027) == 0o027


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_adapter_file_honours_the_umask(tmp_path, umask, mask, expected):
    from xadapter import SpatialAdapter, datasets

    field = datasets.synthetic_field(30, n_stations=20, rank=2, noise_sd=0.5, seed=3)
    adapter = SpatialAdapter(rank=2, fine_scale=None).fit(field["residual"])
    umask(mask)
    adapter.to_netcdf(tmp_path / "adapter.nc")
    assert stat.S_IMODE(os.stat(tmp_path / "adapter.nc").st_mode) == expected


# ---------------------------------------------------------------------- open_weather2k
def test_open_weather2k_by_names_and_by_row_indices(tmp_path):
    path = tmp_path / "weather2k.npy"
    array = _weather2k_file(path, n_stations=7, n_times=50, seed=1)
    by_name = io.open_weather2k(path, variables=["t", "rh"], start="2018-03-01", freq="h", chunks={"time": 20})
    # rows 0-2 are lat, lon, altitude: "t" is row 4 and "rh" row 8 of the published layout
    by_row = io.open_weather2k(path, variables=[4, np.int64(8)], start="2018-03-01", freq="h", chunks={"time": 20})
    for ds in (by_name, by_row):
        assert list(ds.data_vars) == ["t", "rh"]
        assert ds["t"].dims == ("time", "station")
        # lazy: dask-backed, chunked along time with every station in each chunk
        assert all(hasattr(ds[name].data, "dask") for name in ds.data_vars)
        assert ds["t"].chunks == ((20, 20, 10), (7,))
        np.testing.assert_array_equal(ds["t"].values, array[:, 4, :].T)
        np.testing.assert_array_equal(ds["rh"].values, array[:, 8, :].T)
        assert ds["rh"].dtype == array.dtype
        assert ds["rh"].attrs["units"] == "%"
        np.testing.assert_allclose(ds["altitude"].values, array[:, 2, 0], rtol=1e-6)
        assert ds["time"].values[0] == np.datetime64("2018-03-01T00:00")
    xr.testing.assert_identical(by_name.compute(), by_row.compute())
    # names and indices mix; "all" reads the 20 variables in file order
    mixed = io.open_weather2k(path, variables=("ws", 3))
    assert list(mixed.data_vars) == ["ws", "ap"]
    everything = io.open_weather2k(path, variables="all")
    assert len(everything.data_vars) == 20
    np.testing.assert_array_equal(everything["vv"].values, array[:, 22, :].T)
    assert io.read_weather2k is io.open_weather2k


def test_open_weather2k_chunks_pickle_without_the_data(tmp_path):
    # a distributed worker gets the file name, not a copy of the memory map
    import pickle

    path = tmp_path / "weather2k.npy"
    array = _weather2k_file(path, n_stations=40, n_times=2000)
    ds = io.open_weather2k(path, variables="t", chunks=500)
    graph = dict(ds["t"].data.__dask_graph__())
    assert len(pickle.dumps(graph)) < array.nbytes / 20
    restored = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(restored["t"].values, array[:, 4, :].T)


@pytest.mark.parametrize(
    "variables, match",
    [
        (["temperature"], "unknown Weather2K variables"),
        ([2], r"row index 2 is not a variable.*altitude"),
        ([23], r"row index 23 is not a variable; variable rows are 3-22"),
        ([-1], "row index -1"),
        ([True], "neither a short name"),
        ([4.0], "neither a short name"),
        (["t", 4], "requested twice"),
        ([], "empty"),
    ],
)
def test_open_weather2k_bad_variables(tmp_path, variables, match):
    path = tmp_path / "weather2k.npy"
    _weather2k_file(path)
    with pytest.raises(InputError, match=match):
        io.open_weather2k(path, variables=variables)


def test_open_weather2k_bad_files_and_options(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        io.open_weather2k(tmp_path / "missing.npy")
    text = tmp_path / "text.npy"
    text.write_text("not an array")
    with pytest.raises(InputError, match="cannot read"):
        io.open_weather2k(text)
    path = tmp_path / "weather2k.npy"
    _weather2k_file(path)
    with pytest.raises(InputError, match="station_ids has 3 labels for 5 stations"):
        io.open_weather2k(path, station_ids=["a", "b", "c"])
    with pytest.raises(InputError, match="chunks has dims"):
        io.open_weather2k(path, chunks={"hour": 10})
    with pytest.raises(InputError, match="time stamps"):
        io.open_weather2k(path, start="not a date")


def test_temporaries_of_live_writers_are_kept(tmp_path):
    """Only temporaries whose writer process is gone are removed."""
    live = tmp_path / f".out.nc.{os.getppid()}.abcd.tmp"  # the parent process is alive
    dead = tmp_path / ".out.nc.999999999.abcd.tmp"  # no such process
    other = tmp_path / ".other.nc.999999999.abcd.tmp"  # another destination
    for temporary in (live, dead, other):
        temporary.write_bytes(b"partial")
    io.atomic_to_netcdf(xr.Dataset({"a": ("x", [1.0])}), tmp_path / "out.nc")
    assert live.exists() and other.exists() and not dead.exists()
