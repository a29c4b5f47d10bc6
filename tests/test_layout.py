"""The package's shape: no import cycles (deferred imports included), lower layers never reach up,
modules and functions small enough to read at once, and the CLI's help without torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hermesd"
SUBPACKAGES = {"store", "plan", "engine", "daemon", "watchdog", "gateway"}
LOWER = {"store", "plan", "engine", "watchdog"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """hermesd modules a module imports anywhere in its body (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # "from hermesd import memory" imports the module, not the package
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _unit(module: str) -> str:
    """A module's unit in the layer picture: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUBPACKAGES) else module


def test_no_import_cycle_among_modules():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_no_import_cycle_among_subpackages():
    units: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    cycle = _cycle(units)
    assert cycle is None, f"subpackage cycle: {' -> '.join(cycle)}"


def test_lower_layers_never_import_the_daemon_or_the_layers_above():
    above = {"daemon", "hermesd.cli", "hermesd.tasks", "hermesd.planning", "hermesd.profiling"}
    offenders = [f"{module} -> {target}" for module, targets in _graph().items() if _unit(module) in LOWER
                 for target in targets if _unit(target) in above]
    assert not offenders, offenders
    plan_to_engine = [f"{m} -> {t}" for m, ts in _graph().items() if _unit(m) == "plan"
                      for t in ts if _unit(t) == "engine"]
    assert not plan_to_engine, f"the engine takes a plan; plans never import the engine: {plan_to_engine}"


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for module, path in _modules().items():
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_help_and_version_do_not_import_torch():
    probe = ("import sys, runpy\nsys.argv = ['hermesd', '{flag}']\n"
             "try:\n    runpy.run_module('hermesd.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    for flag in ("--help", "--version"):
        done = subprocess.run([sys.executable, "-c", probe.format(flag=flag)], capture_output=True, text=True,
                              timeout=60)
        assert done.stderr.strip().endswith("NO-TORCH"), (flag, done.stderr)
        assert ("usage: hermesd" in done.stdout) if flag == "--help" else done.stdout.startswith("hermesd 0.")


def test_the_gateway_is_a_translator_without_torch_or_the_daemon():
    """hermesd.gateway reaches the daemon only through hermes_client: it imports no other hermesd layer,
    and serving HTTP loads no torch."""
    allowed = {"gateway", "hermesd.version"}
    offenders = [f"{m} -> {t}" for m, ts in _graph().items() if _unit(m) == "gateway"
                 for t in ts if _unit(t) not in allowed]
    assert not offenders, offenders
    probe = ("import sys\nfrom hermesd.gateway.app import create_app\nfrom hermesd.gateway.config import "
             "GatewaySettings\ncreate_app(GatewaySettings())\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    checkout = PACKAGE.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(checkout / "client")])}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert done.stdout.strip() == "False False", done.stderr
