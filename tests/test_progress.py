import sys

import numpy as np
import pytest

from xadapter.engine.admm import fit_adapter
from xadapter.engine.progress import progress_bar, progress_enabled
from xadapter.exceptions import InputError


def gappy(n_times=40, n_sites=15, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n_times, 2)) @ rng.standard_normal((2, n_sites)) + 0.3 * rng.standard_normal(
        (n_times, n_sites))
    data[rng.uniform(size=data.shape) < 0.1] = np.nan
    return data


def test_bar_shown_with_true_names_the_loop(capsys):
    fit_adapter(gappy(), 2, progress=True)
    err = capsys.readouterr().err
    assert "xadapter fit converged" in err and "basis" in err
    covariates = np.random.default_rng(1).standard_normal((40, 2))
    fit_adapter(gappy(), 2, covariates=covariates, progress=True)  # a trend: the ADMM
    err = capsys.readouterr().err
    assert "xadapter ADMM converged" in err and "basis" in err


def test_admm_silent_with_false(capsys):
    fit_adapter(gappy(), 2, progress=False)
    assert capsys.readouterr().err == ""


def test_none_is_silent_when_stderr_is_not_a_terminal(capsys):
    assert not sys.stderr.isatty()
    fit_adapter(gappy(), 2, progress=None)
    fit_adapter(gappy(), 2)  # the default
    assert capsys.readouterr().err == ""


def test_none_shows_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_enabled(None)
    with progress_bar(None, 3, "work") as bar:
        bar.update()
    assert "work" in capsys.readouterr().err


def test_callable_progress_still_gets_every_record(capsys):
    records = []
    fit = fit_adapter(gappy(), 2, progress=records.append)
    assert [r["iteration"] for r in records] == list(fit.history["iteration"])
    assert capsys.readouterr().err == ""


def test_bad_progress_value():
    with pytest.raises(InputError, match="progress must be True"):
        progress_enabled("yes")


def test_site_cv_bar(capsys):
    from types import SimpleNamespace

    from xadapter.engine.validation import cross_validate_sites, site_folds

    rng = np.random.default_rng(1)
    n_sites = 30
    planar = rng.uniform(0, 100, (n_sites, 2))
    basis = np.linalg.qr(rng.standard_normal((n_sites, 2)))[0]
    # the fields of a fitted model that site CV reads, without a fine scale
    model = SimpleNamespace(basis=basis, rotation=np.eye(2), eigenvalues=np.array([2.0, 1.0]),
                            mean=np.zeros(n_sites), noise_variance=0.5, planar=planar, graph_coords=planar,
                            geographic=False, fine=None, fine_neighbors=30, extension=None)
    data = rng.standard_normal((10, n_sites))
    folds = site_folds(n_sites, 3)
    cross_validate_sites(model, data, folds, progress=False)
    assert capsys.readouterr().err == ""
    cross_validate_sites(model, data, folds, progress=True)
    assert "site CV" in capsys.readouterr().err
