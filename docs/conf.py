"""Sphinx configuration of fusionnet's documentation site: build it with
``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (the ``[docs]`` extra)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "_ext"), str(HERE.parent)]

import fusionnet  # noqa: E402

project = "fusionnet"
author = "the fusionnet authors"
copyright = "2026, the fusionnet authors"
release = version = fusionnet.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "fusionnet_docs",  # the generated API and settings references (docs/_ext/fusionnet_docs.py)
    "fusionnet_figures",  # the measured figures as plots (docs/_ext/fusionnet_figures.py)
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_data"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"fusionnet {release}"
html_static_path = []
smartquotes = False  # '--flag' stays two hyphens (an en dash otherwise)
