"""Faults: interrupted writes, killed workers and interrupted fits lose nothing and
never give a wrong answer."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

import xadapter
from xadapter import SpatialAdapter, datasets
from xadapter.engine.basis import subspace_distance

FAST = dict(rank=3, fine_scale=None, site_folds=None)


@pytest.fixture(scope="module")
def field():
    return datasets.synthetic_field(60, n_stations=25, rank=2, noise_sd=0.5, seed=8)["residual"]


def test_writer_raising_mid_way_leaves_the_previous_file(field, tmp_path, monkeypatch):
    first = SpatialAdapter(**FAST).fit(field)
    path = tmp_path / "adapter.nc"
    first.to_netcdf(path)
    before = path.read_bytes()
    second = SpatialAdapter(rank=4, fine_scale=None, site_folds=None).fit(field)
    original = xr.Dataset.to_netcdf

    def half_then_fail(self, target, *args, **kwargs):
        original(self, target, *args, **kwargs)
        with open(target, "r+b") as handle:  # a partial file on disk, then the failure
            handle.truncate(os.path.getsize(target) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        second.to_netcdf(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["adapter.nc"]
    assert path.read_bytes() == before
    assert xadapter.load(path).basis.sizes["mode"] == 3


_WRITER = textwrap.dedent("""
    import sys, numpy as np, xarray as xr
    from xadapter.io.netcdf import atomic_to_netcdf
    big = xr.Dataset({f"v{i}": (("a", "b"), np.random.default_rng(i).standard_normal((2000, 2000)))
                      for i in range(12)})
    print("writing", flush=True)
    atomic_to_netcdf(big, sys.argv[1])
""")


def test_writer_killed_mid_way_leaves_the_previous_file(field, tmp_path):
    path = tmp_path / "adapter.nc"
    SpatialAdapter(**FAST).fit(field).to_netcdf(path)
    before = path.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    process = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        # wait until the temporary file exists and grows, then kill
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.nc.")]
            if partial and partial[0].stat().st_size > 1_000_000:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the writer never started writing")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    # the destination is untouched; only the hidden temporary of the killed writer remains,
    # and the next write to the same path removes it
    assert path.read_bytes() == before
    assert xadapter.load(path).is_fitted
    assert {p.name for p in tmp_path.iterdir()} - {"adapter.nc", "writer.py"} <= {
        p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.nc.") and p.name.endswith(".tmp")}
    SpatialAdapter(**FAST).fit(field).to_netcdf(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.nc", "writer.py"]


def test_keyboard_interrupt_during_a_fit_keeps_the_previous_state(field, monkeypatch):
    from xadapter.engine import pipeline

    observed = field.copy(deep=True)
    adapter = SpatialAdapter(**FAST)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fit_covariance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adapter.fit(field)
    assert not adapter.is_fitted
    xr.testing.assert_identical(field, observed)
    monkeypatch.undo()
    adapter.fit(field)
    basis = adapter.basis.copy()
    state = adapter.state
    # a refit interrupted later (after the engine, while labelling) keeps the previous fit
    from xadapter.labelled import model as model_module

    monkeypatch.setattr(model_module.state_io, "to_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adapter.fit(field.isel(time=slice(0, 30)))
    assert adapter.is_fitted and adapter.state is state
    xr.testing.assert_identical(adapter.basis, basis)
    assert adapter.fitted.scores.shape[0] == 60
    xr.testing.assert_identical(field, observed)


def test_killed_worker_during_a_distributed_fit_never_gives_a_wrong_answer(tmp_path):
    """A worker process killed mid-fit: dask recomputes its tasks (same answer) or the fit fails loudly."""
    distributed = pytest.importorskip("distributed")
    field = datasets.synthetic_field(400, n_stations=60, rank=3, seed=9)["residual"]
    reference = SpatialAdapter(**FAST).fit(field)
    lazy = field.chunk({"time": 20})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        import threading

        def kill_one():
            time.sleep(0.3)
            os.kill(pids[0], signal.SIGKILL)

        killer = threading.Thread(target=kill_one)
        killer.start()
        try:
            fitted = SpatialAdapter(**FAST).fit(lazy)
        except Exception as error:  # a clear error is acceptable, a wrong answer is not
            assert "worker" in str(error).lower() or "Killed" in type(error).__name__, error
            return
        finally:
            killer.join()
    rank = reference.basis.sizes["mode"]
    assert subspace_distance(fitted.basis.values.reshape(-1, rank), reference.basis.values.reshape(-1, rank)) < 1e-8
    np.testing.assert_allclose(fitted.eigenvalues.values, reference.eigenvalues.values, rtol=1e-8)
