"""The layers point one way (face -> callbacks/report -> methods -> functional/backbones; data never imports a
method): checked on what a fresh interpreter really imports, not on the source text."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
names = [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(m for m in sys.modules if m.startswith("tvr_bench."))}))
"""


def _import_everything_in(package: str) -> dict[str, list[str]]:
    """Import every module of `package` in a fresh interpreter; the modules it names and every tvr_bench module loaded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _PROBE, package], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_imports_no_method() -> None:
    """Importing every tvr_bench.data module (prepare/synth/verify commands, every benchmark) loads no method."""
    seen = _import_everything_in("tvr_bench.data")
    assert "tvr_bench.data.commands" in seen["imported"] and "tvr_bench.data.benchmarks.msrvtt" in seen["imported"]
    assert len(seen["imported"]) >= 15
    methods = [m for m in seen["loaded"] if m == "tvr_bench.methods" or m.startswith("tvr_bench.methods.")]
    assert not methods, f"tvr_bench.data imported {methods}"
    upper = [m for m in seen["loaded"] if m.split(".")[1] in {"cli", "prepare_cli", "callbacks", "report", "compare"}]
    assert not upper, f"tvr_bench.data imported modules of upper layers: {upper}"


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, function-level ones and ``import_module("...")`` literals included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_data_module_names_a_method_even_lazily() -> None:
    """No import inside tvr_bench/data (a lazy one in a function included) names tvr_bench.methods."""
    files = sorted((REPO / "tvr_bench" / "data").rglob("*.py"))
    assert len(files) >= 15
    bad = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in files for line, name in _imported_names(path)
           if name == "tvr_bench.methods" or name.startswith("tvr_bench.methods.")]
    assert not bad, bad


def test_methods_import_no_data_module() -> None:
    """The methods reach pixels through the backbone (CLIP's normalisation lives in tvr_bench.backbones): no import
    in tvr_bench/methods, tvr_bench/functional or tvr_bench/backbones names tvr_bench.data or a layer above."""
    files = [p for layer in ("methods", "functional", "backbones") for p in sorted((REPO / "tvr_bench" / layer).rglob("*.py"))]
    assert any(p.name == "base.py" for p in files)
    upper = ("tvr_bench.data", "tvr_bench.callbacks", "tvr_bench.cli", "tvr_bench.report", "tvr_bench.compare")
    bad = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in files for line, name in _imported_names(path)
           if any(name == u or name.startswith(u + ".") for u in upper)]
    assert not bad, bad


def _perf_imports(path: Path) -> list[tuple[int, str]]:
    """`_imported_names` of a tvr_bench/perf file, with its relative imports (`from .run import x`) resolved."""
    found = _imported_names(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(["tvr_bench", "perf"][: 3 - node.level] + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_perf_modules_point_one_way() -> None:
    """perf/run.py is the registry and the command: no other perf module imports it (a lazy import in a function
    included), and perf/harness.py, what every section shares, imports no perf module but perf/memory.py."""
    files = {p.name: p for p in sorted((REPO / "tvr_bench" / "perf").glob("*.py"))}
    assert {"run.py", "harness.py", "data_bench.py", "eval_bench.py", "metrics_bench.py", "train_bench.py"} <= set(files)
    to_run = [f"{name}:{line} imports {module}" for name, path in files.items() if name != "run.py"
              for line, module in _perf_imports(path) if module == "tvr_bench.perf.run" or module.startswith("tvr_bench.perf.run.")]
    assert not to_run, to_run
    memory = "tvr_bench.perf.memory"
    from_harness = [f"harness.py:{line} imports {module}" for line, module in _perf_imports(files["harness.py"])
                    if module.startswith("tvr_bench.perf.") and not (module == memory or module.startswith(memory + "."))]
    assert not from_harness, from_harness
