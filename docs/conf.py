"""Sphinx configuration of the xadapter documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (``pip install ".[docs]"``).
The build needs no network: no intersphinx inventories are fetched and the gallery
scripts in ``docs/examples/`` are shown, not executed (their figures are kept in
``docs/images/gallery/``, checked by ``tests/test_docs.py``).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive, directives

ROOT = Path(__file__).resolve().parent.parent
# the package is normally installed (editable); fall back to the source tree
sys.path.insert(0, str(ROOT))

import xadapter  # noqa: E402

# ---------------------------------------------------------------------- project
project = "xadapter"
author = "xadapter developers"
copyright = "xadapter developers"
version = release = xadapter.__version__

# ---------------------------------------------------------------------- general
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []

# math in the Markdown pages ($...$, $$...$$) and ```{math} blocks
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# ---------------------------------------------------------------------- autodoc
# The API pages are hand-written automodule/autoclass pages; the autosummary tables
# only link to them, so no stub files are generated into the source tree.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections carry the types
autodoc_default_options = {"members": True, "show-inheritance": False}

# numpydoc: no per-class member tables (autodoc already documents the members, and
# the tables would point at stub pages that are not generated).
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

# Cross-references to numpy/xarray/scipy types cannot resolve without intersphinx
# (no network at build time); nitpicky stays off so that they render as plain text.
nitpicky = False

# ---------------------------------------------------------------------- html
html_theme = "alabaster"
html_title = f"xadapter {release}"
html_static_path = []
html_theme_options = {
    "description": "Spatial adapters for the residuals of frozen forecast models, on xarray",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
html_show_sourcelink = False


# ---------------------------------------------------------------------- CLI help
class CommandHelp(Directive):
    """``.. command-help:: [SUBCOMMAND]``: the ``--help`` text of the ``xadapter`` command.

    Taken from :func:`xadapter.cli.build_parser` at build time, so the options shown
    are the ones the installed command accepts.
    """

    optional_arguments = 1
    has_content = False
    option_spec = {"width": directives.positive_int}

    def run(self):
        from xadapter.cli import build_parser

        width = self.options.get("width", 88)
        previous = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = str(width)  # argparse wraps help text to $COLUMNS
        try:
            parser = build_parser()
            if self.arguments:
                name = self.arguments[0]
                subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
                if name not in subparsers.choices:
                    raise self.error(f"xadapter has no subcommand {name!r}")
                parser = subparsers.choices[name]
            text = parser.format_help()
        finally:
            if previous is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = previous
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


# ---------------------------------------------------------------------- autodoc hooks
def skip_foreign_members(app, what, name, obj, skip, options):
    """Leave out classes and functions a module imports from elsewhere (e.g. scipy's cKDTree).

    autodoc cannot always tell that a compiled class is imported, and then tries to
    document it on every engine page that imports it.
    """
    if what == "module" and (inspect.isclass(obj) or inspect.isroutine(obj)):
        module = getattr(obj, "__module__", None) or ""
        if not module.startswith("xadapter"):
            return True
    return None


#: Where short names in package docstrings (``:class:`SpatialAdapter```, ``:func:`load```,
#: ``:class:`Sites```) are documented when the docstring's own module does not hold them.
SHORT_NAME_MODULES = (
    "xadapter",
    "xadapter.labelled.model",
    "xadapter.exceptions",
    "xadapter.engine",
    "xadapter.engine.fitted",
    "xadapter.engine.sites",
)


def resolve_xadapter_names(app, env, node, contnode):
    """Resolve short names that the Python domain misses (see ``SHORT_NAME_MODULES``)."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or target.startswith("xadapter"):
        return None
    domain = env.get_domain("py")
    for module in SHORT_NAME_MODULES:
        found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], f"{module}.{target}", node,
                                    contnode)
        if found is not None:
            return found
    return None


def setup(app):
    app.add_directive("command-help", CommandHelp)
    app.connect("missing-reference", resolve_xadapter_names)
    app.connect("autodoc-skip-member", skip_foreign_members)
    return {"parallel_read_safe": True}
