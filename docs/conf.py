"""Sphinx configuration of the mac_optax documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (``pip install
-e '.[docs]'``). ``tests/test_docs.py`` runs the same build and executes
every Python block of these pages.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, also without install

project = 'mac_optax'
author = 'mac_optax contributors'
copyright = 'mac_optax contributors'  # pylint: disable=redefined-builtin

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
]

source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
exclude_patterns = ['_build']
root_doc = 'index'

myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3

autosummary_generate = True
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'members': True, 'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = 'furo'
html_title = 'mac_optax'
