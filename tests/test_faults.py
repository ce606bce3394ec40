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
from xadapter.exceptions import WorkerLostError

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
    left = {p.name for p in tmp_path.iterdir()} - {"adapter.nc", "writer.py"}
    assert left and all(name.startswith(f".adapter.nc.{process.pid}.") and name.endswith(".tmp") for name in left)
    SpatialAdapter(**FAST).fit(field).to_netcdf(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.nc", "writer.py"]


def test_stale_temporaries_of_dead_writers_are_removed_by_the_next_write_to_the_same_path(field, tmp_path):
    """Only the temporaries of ``path`` whose writer process is gone are removed, and only by
    the next write to ``path`` (see :func:`xadapter.io.netcdf.atomic_to_netcdf`)."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()  # reaped: its pid belongs to no process
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path = tmp_path / "adapter.nc"
        SpatialAdapter(**FAST).fit(field).to_netcdf(path)
        dead = f".adapter.nc.{exited.pid}.k3x_9q0a.tmp"
        kept = {
            f".adapter.nc.{sleeper.pid}.a8b7c6d5.tmp",  # a live concurrent writer
            f".adapter.nc.{os.getpid()}.z1y2x3w4.tmp",  # another thread of this process
            f".other.nc.{exited.pid}.k3x_9q0a.tmp",  # another destination
            # a live writer of a destination whose name extends this one, "adapter.nc.<pid>"
            f".adapter.nc.{exited.pid}.{sleeper.pid}.a8b7c6d5.tmp",
            f".adapter.nc.{exited.pid}.tmp",  # not a name this module gives
        }
        for name in kept | {dead}:
            (tmp_path / name).write_bytes(b"partial")
        names = {p.name for p in tmp_path.iterdir()}
        assert xadapter.load(path).is_fitted
        assert {p.name for p in tmp_path.iterdir()} == names  # reading removes nothing
        SpatialAdapter(rank=2, fine_scale=None, site_folds=None).fit(field).to_netcdf(path)
        assert {p.name for p in tmp_path.iterdir()} == names - {dead}
        assert xadapter.load(path).basis.sizes["mode"] == 2
    finally:
        sleeper.kill()
        sleeper.wait()


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


def test_keyboard_interrupt_mid_fit_on_dask_input_leaves_no_scratch_files(gappy_field, tmp_path, monkeypatch):
    """Ctrl-C in the middle of an iteration on dask input (local scheduler: the state
    in ``.npy`` files of a scratch folder ``xadapter-state-*``): the input is unchanged, the
    adapter unfitted, and the scratch folder is gone once the interrupted fit is collected."""
    import gc

    import dask

    from xadapter.engine import alternation, store
    from xadapter.exceptions import NotFittedError

    lazy = gappy_field.chunk({"time": 40})
    before = lazy.copy(deep=True)
    folders, fills, scratch = set(), [], []
    original = store.DiskStore.apply

    def apply_interrupted(disk, kernel, *args, **kwargs):
        folders.add(disk.directory)
        if kernel is alternation._k_fill:
            fills.append(kernel)
            # 3 blocks: the second iteration, on its second block, after the fill and
            # before the updated block is saved
            if len(fills) == 5:
                def interrupted(*kernel_args):
                    kernel(*kernel_args)
                    scratch.extend(sorted(os.listdir(disk.directory)))
                    raise KeyboardInterrupt
                return original(disk, interrupted, *args, **kwargs)
        return original(disk, kernel, *args, **kwargs)

    monkeypatch.setattr(store.DiskStore, "apply", apply_interrupted)
    adapter = SpatialAdapter(**GAPPY)
    # the local scheduler even if a distributed client of another test is still open
    with dask.config.set({"temporary-directory": str(tmp_path), "scheduler": "threads"}):
        with pytest.raises(KeyboardInterrupt):
            adapter.fit(lazy)
    assert len(fills) == 5
    assert len(folders) == 1 and os.path.dirname(folders.pop()) == str(tmp_path)
    assert {"data-0.npy", "fills-1.npy", "steps-2.npy"} <= set(scratch)  # the state was on disk when interrupted
    assert lazy.chunks is not None
    xr.testing.assert_identical(lazy, before)
    assert not adapter.is_fitted
    with pytest.raises(NotFittedError):
        adapter.basis
    with pytest.raises(NotFittedError):
        adapter.krige(gappy_field.isel(time=slice(0, 2)))
    gc.collect()
    assert list(tmp_path.glob("xadapter-state-*")) == []


@pytest.fixture(scope="module")
def gappy_field():
    """Gaps make the fit iterate (fill and basis), with its state in the store's blocks."""
    return datasets.synthetic_field(120, n_stations=30, rank=3, missing=0.1, seed=9)["residual"]


#: Loose enough for a few iterations (numpy and distributed run the same ones).
GAPPY = dict(FAST, tol=1e-2)


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes (each under a nanny, which restarts it if killed)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as local, distributed.Client(local) as client:
        yield client


@pytest.mark.parametrize("shared", [False, True], ids=["recomputable", "shared-values-lost"])
def test_killed_worker_during_a_distributed_fit_never_gives_a_wrong_answer(gappy_field, cluster, monkeypatch,
                                                                          shared):
    """A worker process killed at a set iteration of the fit: dask recomputes its blocks (the same
    answer as numpy) or the fit stops with a WorkerLostError naming the worker; never a wrong
    answer.

    The blocks' history of kernel calls lets dask recompute a lost block, unless a value
    the calls took was shared with the workers (``WorkerStore.share``, for arguments above
    ``_SHARE_BYTES``): ``shared`` makes every argument shared, so the lost blocks' history
    refers to values that are gone.
    """
    import distributed

    from xadapter.engine import alternation, store

    reference = SpatialAdapter(**GAPPY).fit(gappy_field)
    kill_at = 3
    assert not reference.history.attrs["skipped_loop"] and reference.history.sizes["iteration"] > kill_at
    client = cluster
    client.wait_for_workers(2, timeout=60)
    if shared:
        monkeypatch.setattr(store, "_SHARE_BYTES", 0)
    iterations, killed = [], []
    original = alternation._Alternation.step

    def step_killing_a_worker(driver, iteration):
        iterations.append(iteration)
        if len(iterations) == kill_at:
            # the worker holding the first block alone, so that its loss matters
            distributed.wait(driver.store.blocks)
            holders = client.who_has(driver.store.blocks)
            alone = [where[0] for where in holders.values() if len(where) == 1]
            assert alone, holders
            address = alone[0]
            pid = client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)
            # the scheduler knows the worker is gone before the fit goes on
            deadline = time.monotonic() + 60
            while address in client.nthreads():
                assert time.monotonic() < deadline, "the scheduler never saw the worker die"
                time.sleep(0.01)
            killed.append((address, pid))
        return original(driver, iteration)

    monkeypatch.setattr(alternation._Alternation, "step", step_killing_a_worker)
    try:
        fitted = SpatialAdapter(**GAPPY).fit(gappy_field.chunk({"time": 60}))
    except WorkerLostError as error:
        # the worker died mid-fit, and the error says which one and what was lost
        assert len(killed) == 1 and len(iterations) == kill_at
        message = str(error)
        assert killed[0][0] in message and "iterative state" in message and "time rows" in message
        assert "run the fit again" in message
        return
    # the worker died mid-fit: iterations ran after the kill
    assert len(killed) == 1 and len(iterations) > kill_at
    assert killed[0][0] not in client.nthreads()
    assert fitted.history.sizes["iteration"] == reference.history.sizes["iteration"]
    rank = reference.basis.sizes["mode"]
    assert subspace_distance(fitted.basis.values.reshape(-1, rank), reference.basis.values.reshape(-1, rank)) < 1e-8
    np.testing.assert_allclose(fitted.eigenvalues.values, reference.eigenvalues.values, rtol=1e-8)
    assert fitted.noise_variance == pytest.approx(reference.noise_variance, rel=1e-8)
    observed = gappy_field.isel(time=slice(0, 4)).where(gappy_field.station % 3 != 0)
    np.testing.assert_allclose(fitted.krige(observed)["mean"].values, reference.krige(observed)["mean"].values,
                               rtol=1e-8, atol=1e-8 * float(np.abs(reference.krige(observed)["mean"]).max()))
