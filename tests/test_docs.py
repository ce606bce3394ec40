"""The documentation builds without a warning, and its code runs.

``sphinx-build -W`` turns every warning into an error: a broken docstring, a missing
page in a toctree, an example file that moved. The build reads no network (no
intersphinx) and runs no gallery script; the gallery scripts are run here instead,
and must write the figures the gallery page shows. The README's quick start and
``docs/quickstart.py`` are run too, so that neither goes out of date.
"""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
#: Where the gallery's figures are kept, relative to the docs folder.
GALLERY_IMAGES = "images/gallery"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gallery_figures():
    """File names of the figures that ``docs/gallery.rst`` shows."""
    text = (DOCS / "gallery.rst").read_text(encoding="utf-8")
    return re.findall(rf"^\.\. image:: {GALLERY_IMAGES}/(\S+\.png)$", text, flags=re.MULTILINE)

@pytest.fixture(scope="module")
def html(tmp_path_factory):
    for module in ("sphinx", "numpydoc", "myst_parser"):
        pytest.importorskip(module)
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
                 "user-guide/grids", "user-guide/stations", "user-guide/dask", "user-guide/cli",
                 "user-guide/new-sites", "user-guide/calibration"):
        assert (html / f"{page}.html").is_file(), page


def test_gallery_page_shows_the_figures(html):
    page = (html / "gallery.html").read_text(encoding="utf-8")
    figures = _gallery_figures()
    assert figures
    for name in figures:
        assert (html / "_images" / name).is_file(), name
        assert f"_images/{name}" in page, name


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


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_gallery_script_writes_the_figures_shown(script, tmp_path):
    pytest.importorskip("matplotlib")
    figures = tmp_path / "figures"
    env = {**os.environ, "XADAPTER_EXAMPLES_OUTPUT": str(figures), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    written = sorted(path.name for path in figures.glob("*.png"))
    assert written, f"{script.name} wrote no PNG to XADAPTER_EXAMPLES_OUTPUT"
    assert not list(tmp_path.glob("*.png")), "a figure went to the working folder"
    for name in written:
        assert (figures / name).read_bytes()[:8] == PNG_SIGNATURE, name
    # the gallery shows exactly this script's figures (its number prefixes their names), and keeps a copy
    number = script.name.split("_")[0] + "_"
    assert sorted(name for name in _gallery_figures() if name.startswith(number)) == written
    for name in written:
        assert (DOCS / GALLERY_IMAGES / name).is_file(), f"{name} is not in docs/{GALLERY_IMAGES}"


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    """The first ``python`` block of README.md runs as it stands."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^```python\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    assert block, "README.md has no python block"
    monkeypatch.chdir(tmp_path)  # it writes adapter.nc
    namespace = {"__name__": "__main__"}
    exec(compile(block.group(1), str(ROOT / "README.md"), "exec"), namespace)
    assert namespace["adapter"].is_fitted and (tmp_path / "adapter.nc").is_file()
    assert not namespace["filled"]["mean"].isnull().any()
    assert (namespace["maps"]["variance"] > 0).all()


def test_quickstart_runs(tmp_path, monkeypatch):
    """The quick start shown on the getting-started page (docs/quickstart.py)."""
    monkeypatch.chdir(tmp_path)  # it writes adapter.nc
    namespace = runpy.run_path(str(DOCS / "quickstart.py"), run_name="__main__")
    adapter = namespace["adapter"]
    assert adapter.is_fitted and (tmp_path / "adapter.nc").is_file()
    filled = namespace["filled"]
    assert not filled["mean"].isnull().any()
