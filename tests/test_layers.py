"""The packages form layers, and no module imports one from a layer above its own.

Two checks: every import statement in the source (inside functions too, where an import runs late), and what
importing a package's modules actually loads, in a fresh interpreter per package (re-exports and side effects
that no statement of the module shows).
"""

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "maxllama"

# From the ground up; packages on one row may import each other.
LAYERS = [
    ("base",),  # tree paths, the train-state type, signals and exit codes
    ("config",),
    ("parallel",),
    ("metap",),  # the runtime rules the model is built with
    ("model",),
    ("data",),
    ("checkpoint",),
    ("train",),
    ("inference", "interop", "sweep"),
    ("studies",),  # analyses that train and plot
    ("bench",),
    ("cli", "__main__"),
]
LEVEL = {package: level for level, row in enumerate(LAYERS) for package in row}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> list[str]:
    return sorted(".".join(("maxllama", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py"))


def imported_in_source(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "maxllama":  # `from maxllama import cli`
                names.update(f"maxllama.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("maxllama.") and package_of(n) in LEVEL}


def upward(importer: str, imported: set[str]) -> list[str]:
    own = LEVEL[package_of(importer)]
    return sorted(f"{importer} -> {name} ({package_of(importer)} is below {package_of(name)})"
                  for name in imported if LEVEL[package_of(name)] > own)


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in modules()} - {"__init__"}
    assert packages <= set(LEVEL), f"give {sorted(packages - set(LEVEL))} a row of LAYERS"


def test_no_import_statement_runs_up_the_layers():
    found = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("maxllama", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        if package_of(module) in LEVEL:
            found += upward(module, imported_in_source(path))
    assert not found, "\n".join(found)


LOADED = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("maxllama."))))
"""


def _loaded_by(package: str) -> tuple[str, set[str]]:
    names = [m for m in modules() if package_of(m) == package and m != "maxllama.__main__"]
    result = subprocess.run([sys.executable, "-c", LOADED, json.dumps(names)], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return package, set(json.loads(result.stdout.splitlines()[-1]))


def test_importing_a_package_loads_nothing_above_it():
    packages = [p for row in LAYERS for p in row if p != "__main__"]
    with ThreadPoolExecutor(2) as pool:
        loaded = dict(pool.map(_loaded_by, packages))
    found = [line for package, names in loaded.items()
             for line in upward(f"maxllama.{package}", {n for n in names if package_of(n) in LEVEL})]
    assert not found, "\n".join(found)
