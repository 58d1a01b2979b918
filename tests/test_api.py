"""The public API as a type checker and a reader see it: every public function, class and
method of ``psal`` and ``psal.apps`` annotated in full, and the ``py.typed`` marker shipped."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import psal

APP_MODULES = ("colorize", "inpaint", "inpaint_net", "internal_sr", "metrics", "upscale")


def _public():
    """``(qualified name, callable)`` of psal's public names and of psal.apps' public functions
    and classes (with their public methods and ``__init__``)."""
    items = [(f"psal.{name}", getattr(psal, name)) for name in psal.__all__ if name != "__version__"]
    for mod_name in APP_MODULES:
        mod = importlib.import_module(f"psal.apps.{mod_name}")
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                items.append((f"{mod.__name__}.{name}", obj))
    out = []
    for qual, obj in items:
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if inspect.isfunction(member) and (not name.startswith("_") or name == "__init__"):
                    out.append((f"{qual}.{name}", member))
                elif isinstance(member, property) and not name.startswith("_"):
                    out.append((f"{qual}.{name}", member.fget))
        elif callable(obj):
            out.append((qual, obj))
    return out


def test_every_public_callable_is_fully_annotated():
    missing = []
    for qual, fn in _public():
        sig = inspect.signature(fn)
        for name, param in sig.parameters.items():
            if name in ("self", "cls"):
                continue
            if param.annotation is inspect.Parameter.empty:
                missing.append(f"{qual}({name})")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{qual} -> ?")
    assert not missing, missing
    assert len(_public()) > 40  # the walk found the API (measured 64)


def test_the_package_says_it_is_typed():
    assert (Path(psal.__file__).parent / "py.typed").is_file()


def test_the_reference_documents_every_public_name():
    """Every public function and class of ``psal`` and of the image tools has an autodoc entry
    in the reference (``docs/*.rst``; ``make docs`` builds it with warnings as errors)."""
    import re

    docs = Path(__file__).resolve().parents[1] / "docs"
    documented = set()
    for page in docs.glob("*.rst"):
        documented |= set(re.findall(r"^\.\. auto(?:function|class):: (\S+)", page.read_text(), flags=re.M))
    wanted = {f"psal.{name}" for name in psal.__all__ if name != "__version__"}
    wanted |= {
        "psal.apps.inpaint.inpaint", "psal.apps.inpaint_net.inpaint_with_model", "psal.apps.inpaint_net.InpaintNet",
        "psal.apps.inpaint_net.load_pretrained", "psal.apps.colorize.colorize", "psal.apps.upscale.upscale",
        "psal.apps.internal_sr.internal_upscale", "psal.apps.internal_sr.InternalNet",
    }  # fmt: skip
    assert wanted <= documented, sorted(wanted - documented)
