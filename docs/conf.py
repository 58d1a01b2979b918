"""Sphinx configuration of psal's reference (``make docs``: HTML in out/docs, warnings are errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TRITON_INTERPRET", "0")

import psal  # noqa: E402
from psal.cli import main as cli  # noqa: E402

project = "psal"
author = "the psal developers"
copyright = "2026, the psal developers"
release = version = psal.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
templates_path: list[str] = []
exclude_patterns = ["_build", "_generated/*", "gpu/*", "Thumbs.db", ".DS_Store"]
html_theme = "furo"
html_title = f"psal {release}"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": False, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False


def _cli_reference() -> None:
    """``_generated/cli.rst``: the help of ``psal`` and of each subcommand, as the command prints it."""
    parser = cli._parser()
    out = ["psal", "", ".. code-block:: text", ""]
    out += ["   " + line for line in parser.format_help().splitlines()]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        out += ["", f"psal {name}", "-" * (len(name) + 5), "", ".. code-block:: text", ""]
        out += ["   " + line for line in p.format_help().splitlines()]
    target = Path(__file__).parent / "_generated" / "cli.rst"
    target.parent.mkdir(exist_ok=True)
    text = "\n".join(out) + "\n"
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)


_cli_reference()
