"""Mutation testing of the core modules: how much of the code do the tests actually guard?

Not part of CI (a full run takes tens of minutes). For every *mutant* (one small change to one
module: an operator flipped, a constant ±1, a condition negated, a ``raise`` deleted, a ``return``
made to return ``None``) the module's relevant tests run; a mutant is *killed* when a test fails,
*survived* when all pass, *timed out* when the tests take longer than the limit (counted as
killed: an infinite loop is a detected change). The report lists every survivor by line.

Safety: the worktree is never edited. Each mutant is written into a fresh temporary copy of
``src/weightavg``; the tests run in a forked child whose ``sys.path`` starts with that copy (the
parent imports torch, pytest and hypothesis once, never ``weightavg``), and the copy is deleted
afterwards. A crash or Ctrl-C leaves nothing behind but a temporary directory.

Run (from the repository root, one core, low priority)::

    nice -n 10 python benchmarks/mutation.py                       # every target
    nice -n 10 python benchmarks/mutation.py rules duration        # some targets
    nice -n 10 python benchmarks/mutation.py rules --list          # the mutants, not run
    nice -n 10 python benchmarks/mutation.py engine --json out.json

Targets and their tests are in ``TARGETS``; ``--tests`` overrides the test files, ``--functions``
restricts a target to some functions, by name or ``Class.method`` (the engine targets mutate only
the update path). Each
mutant meets the target's test files one at a time, the first (most specific) first, until one
fails; ``-x`` stops at the first failure and hypothesis runs fixed examples without
shrinking, so a killed mutant costs one short pytest run.
"""

from __future__ import annotations

import argparse
import ast
import compileall
import contextlib
import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "weightavg"


@dataclass(frozen=True)
class Target:
    module: str  # path relative to src/weightavg
    tests: tuple[str, ...]  # test files (relative to the root), most specific first
    # only mutate inside these functions (any nesting), each a name or ``Class.method``; () = everywhere
    functions: tuple[str, ...] = ()
    # test files run only for mutants inside some functions (slow tests for one function's mutants):
    # (test file, (function, ...)); each must also be in ``tests``
    scoped: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def tests_for(self, function: str) -> list[str]:
        """The test files for a mutant inside ``function`` (a name or ``Class.method``)."""
        limits = dict(self.scoped)
        return [t for t in self.tests
                if t not in limits or any(function == f or function.endswith("." + f) for f in limits[t])]


TARGETS: dict[str, Target] = {
    "rules": Target("_rules.py", ("tests/test_rules.py", "tests/test_engine_rules.py", "tests/test_engine.py")),
    "duration": Target("_duration.py", ("tests/test_duration.py", "tests/test_policy.py")),
    "metrics": Target("metrics.py", ("tests/test_metrics.py", "tests/test_swag_bma.py")),
    "schedules": Target("_schedules.py", ("tests/test_schedules.py", "tests/test_policy.py",
                                          "tests/test_swa_utils.py")),
    "bn": Target("_bn.py", ("tests/test_bn_checks.py", "tests/test_bn.py", "tests/test_swa_utils.py",
                            "tests/distributed/test_bn_sync.py", "tests/distributed/test_bn_sync_layers.py"),
                 scoped=(("tests/distributed/test_bn_sync.py", ("recompute_bn", "_pool_across_ranks")),
                         ("tests/distributed/test_bn_sync_layers.py", ("recompute_bn", "_pool_across_ranks")))),
    # the engine's update path: the host-check executor (its CUDA-only offload pieces excepted, which
    # this CPU run cannot reach), the device-side deferred executor, and Averager.update and counters
    "engine": Target("_executor.py", ("tests/test_engine_rules.py", "tests/test_engine.py",
                                      "tests/test_deferred.py", "tests/test_engine_binding.py"),
                     ("LocalExecutor.execute", "finite", "_plan", "_check_plan", "_gather", "_check",
                      "_nonfinite_names", "LocalExecutor.copy", "_update_group", "_probe", "_total", "_run",
                      "scratch_for")),
    "deferred": Target("_deferred.py", ("tests/test_deferred.py", "tests/test_engine_rules.py",
                                        "tests/test_engine.py")),
    "averager": Target("_engine.py", ("tests/test_engine_rules.py", "tests/test_engine.py",
                                      "tests/test_deferred.py"),
                       ("Averager.update", "_copy_after_update", "num_updates", "num_skipped", "settle",
                        "_settle")),
}


@dataclass(frozen=True)
class Mutant:
    index: int
    line: int
    function: str  # the enclosing function, ``Class.method`` for a method ("" at module level)
    kind: str
    before: str
    after: str


_BINOP_SWAP: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift, ast.RShift: ast.LShift,
}
_CMP_SWAP: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}


def _is_docstring(node: ast.AST, parent: ast.AST | None = None) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


class _Mutator(ast.NodeTransformer):
    """Walks a module in a fixed order; numbers every possible mutation; applies number ``target``."""

    def __init__(self, target: int | None, functions: tuple[str, ...]) -> None:
        self.target = target
        self.functions = functions
        self.count = 0
        self.found: list[tuple[int, str, str]] = []  # (line, kind, enclosing function) per index
        self._inside = 0 if functions else 1
        self._classes: list[str] = []  # the enclosing classes, innermost last
        self._function = ""  # the outermost enclosing function, qualified
        self.hit: tuple[ast.AST, ast.AST] | None = None

    # --- bookkeeping -------------------------------------------------------------------------
    def _offer(self, node: ast.AST, kind: str, make: Callable[[Any], ast.AST]) -> ast.AST:
        if not self._inside:
            return node
        i = self.count
        self.count += 1
        self.found.append((getattr(node, "lineno", 0), kind, self._function))
        if i == self.target:
            new = make(copy.deepcopy(node))
            self.hit = (node, new)
            return new
        return node

    def _walk_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        qualified = f"{self._classes[-1]}.{node.name}" if self._classes else node.name
        entered = bool(self.functions) and (node.name in self.functions or qualified in self.functions)
        self._inside += entered
        outer = self._function
        self._function = outer or qualified
        # skip the docstring, the decorators, the annotations: mutate defaults and the body only
        body = node.body[1:] if node.body and _is_docstring(node.body[0], node) else node.body
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [d if d is None else self.visit(d) for d in node.args.kw_defaults]
        new_body: list[ast.stmt] = []
        for stmt in body:
            res = self.visit(stmt)
            new_body.extend(res if isinstance(res, list) else [res])
        node.body = (node.body[:1] if len(body) < len(node.body) else []) + (new_body or [ast.Pass()])
        self._inside -= entered
        self._function = outer
        return node

    visit_FunctionDef = _walk_function
    visit_AsyncFunctionDef = _walk_function

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        body = node.body[1:] if node.body and _is_docstring(node.body[0], node) else node.body
        self._classes.append(node.name)
        new_body = [self.visit(s) for s in body]
        self._classes.pop()
        node.body = (node.body[:1] if len(body) < len(node.body) else []) + new_body
        return node

    # annotations and asserts (type-narrowing invariants) are not behaviour
    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:  # message text: not behaviour we test
        return node

    # --- operators ---------------------------------------------------------------------------
    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swap = _BINOP_SWAP.get(type(node.op))
        if swap is None:
            return node

        def make(n: ast.BinOp) -> ast.AST:
            n.op = swap()
            return n
        return self._offer(node, f"{type(node.op).__name__}->{swap.__name__}", make)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        swap = _BINOP_SWAP.get(type(node.op))
        if swap is None:
            return node

        def make(n: ast.AugAssign) -> ast.AST:
            n.op = swap()
            return n
        return self._offer(node, f"aug {type(node.op).__name__}->{swap.__name__}", make)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for k, op in enumerate(node.ops):
            swap = _CMP_SWAP.get(type(op))
            if swap is None:
                continue

            def make(n: ast.Compare, k: int = k, swap: type = swap) -> ast.AST:
                n.ops[k] = swap()
                return n
            node = self._offer(node, f"{type(op).__name__}->{swap.__name__}", make)  # type: ignore[assignment]
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        swap = ast.Or if isinstance(node.op, ast.And) else ast.And

        def make(n: ast.BoolOp) -> ast.AST:
            n.op = swap()
            return n
        return self._offer(node, f"{type(node.op).__name__}->{swap.__name__}", make)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, (ast.Not, ast.USub)):
            return self._offer(node, f"drop {type(node.op).__name__}", lambda n: n.operand)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        v = node.value
        if isinstance(v, bool):
            return self._offer(node, f"{v}->{not v}", lambda n: ast.Constant(not v))
        if isinstance(v, (int, float)):
            node = self._offer(node, f"{v!r}+1", lambda n: ast.Constant(v + 1))  # type: ignore[assignment]
            return self._offer(node, f"{v!r}-1", lambda n: ast.Constant(v - 1))
        return node

    # --- statements --------------------------------------------------------------------------
    def _negate_test(self, node: ast.If | ast.While | ast.IfExp) -> ast.AST:
        def make(n: ast.If | ast.While | ast.IfExp) -> ast.AST:
            n.test = ast.UnaryOp(ast.Not(), n.test)
            return n
        return self._offer(node, "negate condition", make)

    def visit_If(self, node: ast.If) -> ast.AST:
        self.generic_visit(node)
        return self._negate_test(node)

    def visit_While(self, node: ast.While) -> ast.AST:
        self.generic_visit(node)
        return self._negate_test(node)

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        return self._negate_test(node)

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        return self._offer(node, "delete raise", lambda n: ast.Pass())

    def visit_Return(self, node: ast.Return) -> ast.AST:
        self.generic_visit(node)
        if node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None):
            return node
        return self._offer(node, "return None", lambda n: ast.Return(ast.Constant(None)))


def _mutate(source: str, target: int | None, functions: tuple[str, ...]) -> tuple[str, _Mutator]:
    tree = ast.parse(source)
    m = _Mutator(target, functions)
    tree = m.visit(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree), m


def enumerate_mutants(source: str, functions: tuple[str, ...]) -> list[Mutant]:
    """Every mutant of ``source`` (restricted to ``functions`` when given), numbered in walk order."""
    _, m = _mutate(source, None, functions)
    out = []
    for i in range(m.count):
        _, mi = _mutate(source, i, functions)
        assert mi.hit is not None
        before, after = mi.hit
        out.append(Mutant(i, getattr(before, "lineno", 0), m.found[i][2], m.found[i][1],
                          ast.unparse(before).splitlines()[0][:90], ast.unparse(after).splitlines()[0][:90]))
    return out


# --- running --------------------------------------------------------------------------------


def _preload() -> None:
    """Import the heavy dependencies once in the parent; the forked children share them."""
    import hypothesis
    import pytest  # noqa: F401
    import torch

    torch.set_num_threads(1)
    # no database, fixed examples, and no shrinking: a failing example kills the mutant at once
    hypothesis.settings.register_profile(
        "mutation", database=None, derandomize=True, deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate])
    hypothesis.settings.load_profile("mutation")
    for name in ("numpy", "scipy", "sklearn"):
        with contextlib.suppress(ImportError):
            __import__(name)
    assert "weightavg" not in sys.modules, "the parent must not import weightavg"


def _run_tests(pkg_parent: Path, tests: list[str], timeout: float, quiet: bool = True) -> str:
    """Run ``tests`` in a forked child importing weightavg from ``pkg_parent``: 'killed'/'survived'/'timeout'."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            os.setsid()
            sys.path.insert(0, str(pkg_parent))
            os.chdir(ROOT)
            if quiet:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            import pytest

            args = ["-x", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                    "--rootdir", str(ROOT), "-W", "ignore", *tests]
            code = int(pytest.main(args))
            import weightavg

            if not str(weightavg.__file__).startswith(str(pkg_parent)):
                code = 99  # the mutant was not the code under test
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code == 99:
                raise RuntimeError(f"tests did not import weightavg from {pkg_parent}")
            return "survived" if code == 0 else "killed"
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


_SNAPSHOT: list[Path] = []  # the package as it was when the run started (edits during a run don't leak in)


@contextlib.contextmanager
def _with_source(module: str, source: str) -> Iterator[Path]:
    """A temporary copy of the package with ``module`` replaced by ``source``; yields its parent."""
    if not _SNAPSHOT:
        snap = Path(tempfile.mkdtemp(prefix="weightavg-snapshot-"))
        shutil.copytree(PKG, snap / "weightavg", ignore=shutil.ignore_patterns("__pycache__"))
        # compiled once: each mutant's copy (timestamps kept) recompiles only the mutated module
        compileall.compile_dir(snap / "weightavg", quiet=2)
        _SNAPSHOT.append(snap)
    tmp = Path(tempfile.mkdtemp(prefix="weightavg-mutant-"))
    try:
        shutil.copytree(_SNAPSHOT[0] / "weightavg", tmp / "weightavg")
        path = tmp / "weightavg" / module
        for stale in path.parent.glob(f"__pycache__/{path.stem}.*.pyc"):
            stale.unlink()
        path.write_text(source)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_target(name: str, target: Target, *, only: list[int] | None, timeout_factor: float,
               min_timeout: float, list_only: bool) -> dict:
    with _with_source(target.module, (PKG / target.module).read_text()):
        pass  # takes the snapshot
    source = (_SNAPSHOT[0] / "weightavg" / target.module).read_text()
    mutants = enumerate_mutants(source, target.functions)
    tests = [t for t in target.tests if (ROOT / t).exists()]
    print(f"== {name}: {target.module}, {len(mutants)} mutants; tests: {' '.join(tests)}", flush=True)
    if list_only:
        for mu in mutants:
            print(f"  #{mu.index:4d} line {mu.line:4d} {mu.kind:22s} {mu.before}  =>  {mu.after}")
        return {"target": name, "mutants": len(mutants)}
    # baseline: the unmutated (unparsed) module must pass; its time sets the timeout
    t0 = time.monotonic()
    with _with_source(target.module, _mutate(source, None, target.functions)[0]) as parent:
        base = _run_tests(parent, tests, timeout=3600, quiet=False)
    base_s = time.monotonic() - t0
    if base != "survived":
        raise SystemExit(f"{name}: the tests fail on the unmutated code; fix that first")
    timeout = max(min_timeout, timeout_factor * base_s)
    print(f"   baseline {base_s:.1f} s, timeout per mutant {timeout:.0f} s", flush=True)
    results: dict[str, list[Mutant]] = {"killed": [], "survived": [], "timeout": []}
    for mu in mutants:
        if only is not None and mu.index not in only:
            continue
        mutated, _ = _mutate(source, mu.index, target.functions)
        with _with_source(target.module, mutated) as parent:
            # one test file at a time, the most specific first (it kills most mutants, fast): the
            # others run only while the mutant survives
            outcome = "survived"
            for test in target.tests_for(mu.function):
                if not (ROOT / test).exists():
                    continue
                outcome = _run_tests(parent, [test], timeout)
                if outcome != "survived":
                    break
        results[outcome].append(mu)
        if outcome == "survived":  # at once, so that a long run can be acted upon while it goes on
            print(f"\n   survived #{mu.index} line {mu.line} [{mu.kind}] {mu.before}  =>  {mu.after}", flush=True)
        else:
            print("." if outcome == "killed" else "T", end="", flush=True)
    print()
    n = sum(len(v) for v in results.values())
    caught = len(results["killed"]) + len(results["timeout"])
    score = 100.0 * caught / n if n else 100.0
    print(f"   killed {len(results['killed'])}, timed out {len(results['timeout'])}, "
          f"survived {len(results['survived'])} of {n}: score {score:.1f} %")
    for mu in results["survived"]:
        print(f"   SURVIVED #{mu.index} {target.module}:{mu.line} [{mu.kind}] {mu.before}  =>  {mu.after}")
    return {"target": name, "module": target.module, "tests": tests, "mutants": n, "score": score,
            **{k: [asdict(m) for m in v] for k, v in results.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help=f"targets, of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--only", type=int, nargs="+", help="run only these mutant numbers")
    ap.add_argument("--tests", nargs="+", help="test files to run instead of the target's")
    ap.add_argument("--module", help="mutate this module (relative to src/weightavg) instead of the target's")
    ap.add_argument("--functions", nargs="+", help="only mutate inside these functions")
    ap.add_argument("--timeout-factor", type=float, default=3.0, help="timeout = factor × baseline time")
    ap.add_argument("--min-timeout", type=float, default=30.0, help="lower bound of the timeout, s")
    ap.add_argument("--json", type=Path, help="write the full report here")
    args = ap.parse_args(argv)
    if not hasattr(os, "fork"):
        raise SystemExit("needs os.fork (Linux/macOS)")
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    if not args.list:
        _preload()
    reports = []
    for name in args.targets or list(TARGETS):
        t = TARGETS[name]
        t = Target(args.module or t.module, tuple(args.tests or t.tests),
                   tuple(args.functions) if args.functions else t.functions, () if args.tests else t.scoped)
        reports.append(run_target(name, t, only=args.only, timeout_factor=args.timeout_factor,
                                  min_timeout=args.min_timeout, list_only=args.list))
    if not args.list:
        print("\n== summary")
        for r in reports:
            print(f"   {r['target']:10s} {r['score']:5.1f} %  ({len(r['survived'])} survivors of {r['mutants']})")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    for snap in _SNAPSHOT:
        shutil.rmtree(snap, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
