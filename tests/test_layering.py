"""Who may import whom: the runtime stands alone (core + numpy, tokenizers, Pillow, a backend).

Rules, on every import statement of every module (those inside functions too) and on
importlib.import_module / __import__ calls with a literal name:

  runtime  never imports engines, export, server or benchmarks, nor torch, diffusers, transformers or onnx
  core     never imports a subpackage; core/cli.py gathers the commands, and core/__init__.py re-exports
           the runtime's public names lazily (inside its module __getattr__ only)
  export   never imports runtime, engines, server or benchmarks
  engines  never imports export, server or benchmarks (it builds on core and the runtime)
  server   never imports engines, export or benchmarks (it serves through the runtime)

Folders map to packages through pyproject.toml's [tool.setuptools.package-dir].
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
CORE = "sd3trt"
SUBPACKAGES = sorted(p for p in PACKAGE_DIRS if p != CORE)
HEAVY = ("torch", "diffusers", "transformers", "onnx")
RULES = {  # package -> what it must not import
    "sd3trt.runtime": ["sd3trt.engines", "sd3trt.export", "sd3trt.server", "sd3trt.benchmarks", *HEAVY],
    "sd3trt": SUBPACKAGES,
    "sd3trt.export": ["sd3trt.runtime", "sd3trt.engines", "sd3trt.server", "sd3trt.benchmarks"],
    "sd3trt.engines": ["sd3trt.export", "sd3trt.server", "sd3trt.benchmarks"],
    "sd3trt.server": ["sd3trt.engines", "sd3trt.export", "sd3trt.benchmarks"],
}
EXCEPTIONS = {  # (module, imported package, only inside a function?) that the rules allow
    ("sd3trt.cli", "*", False),
    ("sd3trt", "sd3trt.runtime", True),
}


def modules() -> dict[str, Path]:
    """Every module of the repository's packages: dotted name -> file."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                found.append((base, child.lineno, in_function))
                found.extend((f"{base}.{a.name}", child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.Call) and _dynamic_import(child):
                found.append((child.args[0].value, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _dynamic_import(call: ast.Call) -> bool:
    f = call.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (isinstance(f, ast.Name) and f.id in (
        "import_module", "__import__"))
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


def package_of(module: str) -> str:
    return max((p for p in PACKAGE_DIRS if module == p or module.startswith(p + ".")), key=len, default=module)


def _within(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def violations() -> list[str]:
    found = []
    for module, path in modules().items():
        banned = RULES.get(package_of(module), [])
        for name, line, in_function in imports(path, module):
            for target in banned:
                if not _within(name, target):
                    continue
                allowed = any(m == module and (t == "*" or _within(name, t)) and (in_function or not lazy_only)
                              for m, t, lazy_only in EXCEPTIONS)
                if not allowed:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name}")
    return found


def test_package_folders_come_from_pyproject():
    mods = modules()
    assert PACKAGE_DIRS[CORE] == "core" and PACKAGE_DIRS["sd3trt.runtime"] == "runtime"
    assert mods["sd3trt.runtime.pipeline"] == ROOT / "runtime" / "pipeline.py"
    assert mods["sd3trt"] == ROOT / "core" / "__init__.py" and "sd3trt.cli" in mods


def test_the_walker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("import os\n"
                   "def f():\n    from sd3trt.engines import build\n    import torch.nn\n"
                   "    importlib.import_module('sd3trt.server.app')\n"
                   "from . import images\nfrom ..export import bundle\n")
    got = {(name, inside) for name, _, inside in imports(src, "sd3trt.runtime.probe")}
    assert {("os", False), ("sd3trt.engines.build", True), ("torch.nn", True), ("sd3trt.server.app", True),
            ("sd3trt.runtime.images", False), ("sd3trt.export.bundle", False)} <= got


def test_layering_rules_hold():
    assert violations() == []


def test_runtime_runs_with_heavy_and_sibling_packages_blocked(tiny_sd3):
    _, bundle = tiny_sd3
    blocked = [*HEAVY, "sd3trt.engines", "sd3trt.export", "sd3trt.server", "sd3trt.benchmarks"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
        "import numpy as np, sd3trt\n"
        f"with sd3trt.Img2Img.from_bundle({str(bundle)!r}) as pipe:\n"
        "    res = pipe(np.full((64, 64, 3), 128, np.uint8), 'a cat', steps=2, seed=0)\n"
        "assert res.array.shape == (1, 64, 64, 3), res.array.shape\n"
        f"loaded = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


NO_BACKEND = ("sd3trt.runtime.pipeline", "onnxruntime", "tokenizers")  # `import sd3trt` loads no backend
NO_EXPORT = ("torch", "diffusers", "transformers", "onnx")  # the runtime runs without the export stack
LIGHT = [  # (modules imported, modules they must not load)
    ("sd3trt", NO_BACKEND),
    ("sd3trt.runtime", NO_BACKEND),
    ("sd3trt.runtime.images", NO_BACKEND + NO_EXPORT),
    ("sd3trt.runtime.pipeline, sd3trt.runtime.cli, sd3trt.cli", NO_EXPORT),
    ("sd3trt.runtime.scheduler", NO_EXPORT + ("scipy",)),
    ("sd3trt.runtime.tokenization", NO_EXPORT),
    ("sd3trt.runtime.trt_runner", NO_EXPORT),
]


@pytest.mark.parametrize("modules, heavy", LIGHT, ids=[m for m, _ in LIGHT])
def test_light_imports_stay_light(modules, heavy):
    code = (f"import sys, {modules}\n"
            f"heavy = [m for m in {heavy!r} if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
