"""Every public name documents what it returns, what it raises, and shows an example.

The rule (stated for contributors in docs/development.md):

- Public names: ``weightavg.__all__`` and the ``__all__`` of every module in the API reference
  (``docs/reference/``). Constants and type aliases are exempt; a name exported twice is checked once.
- Functions and public methods (no leading underscore; properties and dunder methods exempt):
  a ``Returns:`` (or ``Yields:``) section unless annotated ``-> None``; a ``Raises:`` section when
  their own body raises, naming every exception class it raises by name there (``raise X(...)``;
  ``raise bad_arg(...)`` counts as ``ConfigError``); what helpers raise is documented by hand.
- Classes: the class docstring (or ``__init__``'s) has ``Raises:`` when ``__init__`` raises, by the
  same rule.
- Examples: every public function and class has an ``Example:``/``Examples:`` section with a
  ``>>>`` doctest (run by ``--doctest-modules``). A public method needs one of its own unless its
  class's (or its defining class's) example already calls it (``.name(`` appears there).
- Overrides of a framework's method (a base class outside weightavg defines the same name:
  ``nn.Module.forward``, Lightning ``Callback`` hooks, ``TrainerCallback`` hooks, ``LRScheduler``
  methods; a mixin's methods that the framework class it is combined with defines) are exempt:
  their contract is the framework's.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

MODULES = ["weightavg", "weightavg.swa_utils", "weightavg.functional", "weightavg.lightning",
           "weightavg.transformers", "weightavg.swag", "weightavg.lowp", "weightavg.metrics",
           "weightavg.posthoc", "weightavg.soup"]
OPTIONAL = {"weightavg.lightning": "lightning", "weightavg.transformers": "transformers"}


def _module(name: str) -> Any:
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    return importlib.import_module(name)


def _public(module: str) -> Iterator[tuple[str, Any]]:
    m = _module(module)
    for name in m.__all__:
        obj = getattr(m, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{module}.{name}", obj


def _ours(obj: Any) -> bool:
    return getattr(obj, "__module__", "").split(".")[0] == "weightavg"


def _methods(cls: type) -> Iterator[tuple[str, Callable[..., Any]]]:
    # a mixin's methods override the framework class its subclasses combine it with
    # (WeightAveragingMixin + transformers.Trainer = WeightAveragingTrainer)
    family = [cls, *(sub for sub in cls.__subclasses__() if _ours(sub))]
    foreign = {n for c in family for base in c.__mro__ if not _ours(base) for n in vars(base)}
    seen: set[str] = set()
    for base in cls.__mro__:
        if not _ours(base):
            continue
        for name, attr in vars(base).items():
            if name.startswith("_") or name in seen or name in foreign:
                continue
            seen.add(name)
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if inspect.isfunction(attr):
                yield name, attr


def _section(doc: str, *titles: str) -> bool:
    return any(re.search(rf"^[ \t]*{t}:[ \t]*$", doc, re.MULTILINE) for t in titles)


def _raises_section(doc: str) -> str:
    m = re.search(r"^([ \t]*)Raises:[ \t]*\n((?:\1[ \t]+.*\n|[ \t]*\n)*)", doc + "\n", re.MULTILINE)
    return m.group(2) if m else ""


def _example(doc: str) -> str:
    m = re.search(r"^([ \t]*)Examples?:[ \t]*\n((?:\1[ \t]+.*\n|[ \t]*\n)*)", doc + "\n", re.MULTILINE)
    return m.group(2) if m and ">>>" in m.group(2) else ""


def _raised(fn: Callable[..., Any]) -> set[str]:
    """Exception class names that the function's own body raises by name (nested defs excluded)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return set()
    top = tree.body[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else ""
                if name == "bad_arg":
                    name = "ConfigError"
                if name and name[0].isupper() and name != "NotImplementedError":
                    out.add(name)
            visit(child)

    visit(top)
    return out


def _returns_none(fn: Callable[..., Any]) -> bool:
    ann = inspect.signature(fn, eval_str=False).return_annotation
    return ann in (None, "None", inspect.Signature.empty, "NoReturn")


def _problems(qual: str, fn: Callable[..., Any], doc: str, *, need_example: bool) -> list[str]:
    out = []
    if not doc:
        return [f"{qual}: no docstring"]
    if not _returns_none(fn) and not _section(doc, "Returns", "Yields"):
        out.append(f"{qual}: no Returns: section")
    raised = _raised(fn)
    if raised:
        section = _raises_section(doc)
        if not section:
            out.append(f"{qual}: raises {sorted(raised)} but has no Raises: section")
        else:
            missing = [e for e in sorted(raised) if e not in section]
            if missing:
                out.append(f"{qual}: Raises: does not name {missing}")
    if need_example and not _example(doc):
        out.append(f"{qual}: no Example: section with a >>> doctest")
    return out


def _audit() -> list[str]:
    problems: list[str] = []
    done: set[int] = set()
    for module in MODULES:
        try:
            names = list(_public(module))
        except pytest.skip.Exception:
            continue
        for qual, obj in names:
            if id(obj) in done:
                continue
            done.add(id(obj))
            if inspect.isfunction(obj):
                problems += _problems(qual, obj, inspect.getdoc(obj) or "", need_example=True)
                continue
            cls_doc = obj.__doc__ or ""
            init = vars(obj).get("__init__")
            init_doc = (init.__doc__ or "") if init else ""
            if issubclass(obj, BaseException):
                if not _example(inspect.cleandoc(cls_doc)):
                    problems.append(f"{qual}: no Example: section with a >>> doctest")
                continue
            if init is not None and inspect.isfunction(init) and _ours(init):
                doc = inspect.cleandoc(cls_doc) + "\n" + inspect.cleandoc(init_doc)
                problems += [p.replace(f"{qual}.__init__", qual) for p in
                             _problems(f"{qual}.__init__", init, doc, need_example=False)
                             if "Returns" not in p]
            class_example = _example(inspect.cleandoc(cls_doc))
            if not class_example:
                problems.append(f"{qual}: no Example: section with a >>> doctest")
            for name, meth in _methods(obj):
                if id(meth) in done:
                    continue
                done.add(id(meth))
                owner = f"{meth.__module__}.{meth.__qualname__}" if meth.__module__ != module else f"{qual}.{name}"
                defining = next(b for b in obj.__mro__ if name in vars(b))
                examples = class_example + _example(inspect.cleandoc(defining.__doc__ or ""))
                problems += _problems(owner, meth, inspect.getdoc(meth) or "",
                                      need_example=f".{name}(" not in examples)
    return problems


KNOWN_GAPS = Path(__file__).with_name("docstring_gaps.txt")


def test_every_public_name_documents_returns_raises_and_an_example() -> None:
    """A ratchet: no gap beyond the listed ones, and a gap that got fixed leaves the list.

    Regenerate the list after closing gaps:
    ``python -c "import tests.test_docstrings as t; t.write_known_gaps()"``.
    """
    problems = set(_audit())
    known = {line for line in KNOWN_GAPS.read_text().splitlines() if line and not line.startswith("#")}
    new, fixed = sorted(problems - known), sorted(known - problems)
    assert not new, f"{len(new)} new docstring gaps (see the rule at the top of this file):\n" + "\n".join(new)
    assert not fixed, f"{len(fixed)} gaps were closed: remove them from {KNOWN_GAPS.name}:\n" + "\n".join(fixed)


def write_known_gaps() -> None:
    """Rewrite docstring_gaps.txt with the gaps that remain (after closing some, never to add)."""
    head = "# Public names still short of the docstring rule (tests/test_docstrings.py). Only shrink this list.\n"
    KNOWN_GAPS.write_text(head + "".join(f"{p}\n" for p in sorted(_audit())))


def test_the_rule_sees_a_gap() -> None:
    """The checker itself: an undocumented raise, return and example are all reported."""

    def f(x: int) -> int:
        """Double x."""
        if x < 0:
            raise ValueError("x")
        return 2 * x

    got = _problems("f", f, inspect.getdoc(f) or "", need_example=True)
    assert [p.split(": ", 1)[1] for p in got] == [
        "no Returns: section", "raises ['ValueError'] but has no Raises: section",
        "no Example: section with a >>> doctest"]

    def g(x: int) -> int:
        """Double x.

        Returns:
            2 x.

        Raises:
            ValueError: if x < 0.

        Example:
            >>> g(2)
            4
        """
        if x < 0:
            raise ValueError("x")
        return 2 * x

    assert _problems("g", g, inspect.getdoc(g) or "", need_example=True) == []
