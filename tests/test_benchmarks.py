"""Smoke runs of the benchmark scripts, so that they never rot.

Each script of ``benchmarks/`` is imported and its ``main`` run with ``--smoke``
(tiny sizes, seconds). The parts that need an optional peer (xeofs, GSTools, PyKrige:
the ``bench`` extra) are skipped when it is not installed; the adapter's part of every
script runs always.
"""

import os
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module", autouse=True)
def benchmarks_on_path():
    # the scripts import their shared helpers (_common, bench_scale) as top-level modules
    sys.path.insert(0, BENCHMARKS)
    yield
    sys.path.remove(BENCHMARKS)


def script(name):
    import importlib

    return importlib.import_module(name)


def test_ozone_holdout_adapter_only():
    summary = script("bench_ozone_holdout").main(["--smoke", "--no-gstools", "--no-pykrige"])
    assert {"first stage alone", "inverse-distance weighting", "adapter, paper model", "adapter, defaults"} <= set(summary)
    assert summary["adapter, defaults"]["rmse"] < summary["first stage alone"]["rmse"]


def test_ozone_holdout_with_peers():
    pytest.importorskip("gstools")
    pytest.importorskip("pykrige")
    summary = script("bench_ozone_holdout").main(["--smoke"])
    for peer in ("ordinary kriging, GSTools", "ordinary kriging, PyKrige"):
        assert np.isfinite(summary[peer]["crps"]) and summary[peer]["cpu"] > 0


def test_eof_adapter_against_svd():
    tables = script("bench_eof").main(["--smoke", "--no-xeofs"])
    (results,) = tables.values()
    from xadapter.engine.basis import subspace_distance

    assert subspace_distance(results["xadapter SpatialAdapter"]["basis"], results["numpy.linalg.svd"]["basis"]) < 1e-8


def test_eof_against_xeofs():
    pytest.importorskip("xeofs")
    tables = script("bench_eof").main(["--smoke"])
    (results,) = tables.values()
    assert "xeofs EOF (solver full)" in results


def test_dense_reference_agrees():
    results = script("bench_dense").main(["--smoke"])
    bench = script("bench_dense")
    ((ours, reference),) = results.values()
    agreement = bench.agreement(ours, reference)
    assert agreement["distance"] < 1e-8
    assert agreement["mean"] < 1e-8 and agreement["variance"] < 1e-8


def test_synthetic():
    rows = script("bench_synthetic").main(["--smoke"])
    assert rows["adapter, defaults (K = 10)"][0]["rmse"] < rows["first stage alone"][0]["rmse"]


def test_plot_scaling(tmp_path):
    pytest.importorskip("matplotlib")
    figure = tmp_path / "scaling.png"
    data = script("plot_scaling").main(["--smoke", "--figure", str(figure)])
    assert figure.stat().st_size > 0
    assert len(data["fits"]) == 2 and len(data["kriging"]) == 2


def test_daily_network_adapter_only():
    summary = script("bench_daily_network").main(["--smoke", "--no-gstools"])
    adapter, baseline = summary["adapter, defaults"], summary["zero residual (no spatial model)"]
    assert adapter["rmse"] < baseline["rmse"] and adapter["crps"] < baseline["crps"]
    assert 0.8 < adapter["coverage"] <= 1.0
