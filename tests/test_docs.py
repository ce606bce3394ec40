"""The documentation builds without a warning, and its quick start runs.

``sphinx-build -W`` turns every warning into an error: a broken docstring, a missing
page in a toctree, an example file that moved. The build reads no network (no
intersphinx) and runs no gallery script.
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

pytest.importorskip("sphinx")
pytest.importorskip("numpydoc")
pytest.importorskip("myst_parser")


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs-html")
    doctrees = tmp_path_factory.mktemp("docs-doctrees")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(doctrees), str(DOCS), str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, f"sphinx-build -W failed:\n{run.stdout}\n{run.stderr}"
    return out


def test_docs_build_without_warnings(html):
    assert (html / "index.html").is_file()
    for page in ("getting-started", "maths", "gallery", "conventions", "design-notes", "benchmarks",
                 "user-guide/dask", "user-guide/cli", "user-guide/new-sites", "user-guide/calibration"):
        assert (html / f"{page}.html").is_file(), page


def test_api_reference_documents_the_model(html):
    api = (html / "api" / "index.html").read_text(encoding="utf-8")
    assert "SpatialAdapter" in api
    model = (html / "api" / "model.html").read_text(encoding="utf-8")
    # the docstrings were imported and rendered, not just named
    assert "Spatial adapter on the residuals of a frozen first-stage predictor" in model
    assert 'id="xadapter.SpatialAdapter.krige"' in model


def test_command_line_page_shows_the_current_options(html):
    from xadapter.cli import build_parser

    page = (html / "user-guide" / "cli.html").read_text(encoding="utf-8")
    subcommands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    for name, parser in subcommands.choices.items():
        assert f"usage: xadapter {name}" in page, name
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)


def test_quickstart_runs(tmp_path, monkeypatch):
    """The quick start shown on the getting-started page (docs/quickstart.py)."""
    monkeypatch.chdir(tmp_path)  # it writes adapter.nc
    namespace = runpy.run_path(str(DOCS / "quickstart.py"), run_name="__main__")
    adapter = namespace["adapter"]
    assert adapter.is_fitted and (tmp_path / "adapter.nc").is_file()
    filled = namespace["filled"]
    assert not filled["mean"].isnull().any()
