"""Which part of the code may import which, checked over the syntax tree of every module
(imports inside functions included). The domain packages stand in layers: a package imports
only packages of lower layers. The wiring stands on the domains: for Dagster each domain's
`assets.py`, `metadata_table`, `resources/`, `sensors/` and `definitions.py`; for Flower each
domain's `steps.py` (the federation steps it registers). The tops of processes (the CLI, the
demo, Flower's apps) stand on everything. docs/architecture.md draws the same table."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.helpers import REPO

OURS = ("kaapana_assets", "resources", "sensors", "definitions")

# The domain layers, lowest first. A unit is a package or module directly under kaapana_assets/.
LAYERS: list[set[str]] = [
    {"kaapana_assets", "environment", "files", "progress", "dicom"},
    {"home", "lake", "preload"},
    {"archive", "nnunet", "federation", "projects"},
    {"ingest", "extensions", "access"},
    {"cohorts", "network"},
    {"training", "dicomweb"},
    {"segmentation"},
    {"synthetic", "evaluation", "lineage"},
    {"federated", "monitoring"},
    {"client"},
    {"gateway"},
]
DAGSTER = {"metadata_table", "resources", "sensors", "definitions"}  # and every domain's `assets`
WIRING = ("assets", "steps")  # a domain's Dagster assets; its federation steps (Flower's apps import them)
# The top of a process: its entry point reads the environment and may import anything.
TOPS = ("kaapana_assets.cli", "kaapana_assets.demo", "kaapana_assets.demo_driver", "kaapana_assets.flower_apps")

LAYER_OF = {unit: number for number, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """`kaapana_assets.ingest.pipeline` → `ingest`; `kaapana_assets.ingest.assets` → `ingest.assets`
    (likewise `steps`); `resources.storage` → `resources`."""
    parts = module.split(".")
    if parts[0] != "kaapana_assets":
        return parts[0]
    if len(parts) == 1:
        return "kaapana_assets"
    if len(parts) >= 3 and parts[2] in WIRING:
        return f"{parts[1]}.{parts[2]}"
    return parts[1]


def may_import(importer: str, imported: str) -> bool:
    if importer in DAGSTER or importer.endswith((".assets", ".steps")):
        if importer == "resources":  # resources hand domain code to assets: they know no asset
            return imported in LAYER_OF
        if importer == "definitions":
            return True
        return imported in LAYER_OF or imported in DAGSTER - {"definitions", "sensors"} or imported.endswith(".assets")
    if importer not in LAYER_OF:
        raise AssertionError(f"{importer} has no place in the table of tests/test_layering.py")
    return imported in LAYER_OF and LAYER_OF[imported] < LAYER_OF[importer]


def _module_name(path: Path) -> tuple[str, str]:
    """The module's dotted name, and the package its relative imports start from."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rpartition(".")[0]


def _is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports() -> dict[tuple[str, str], list[str]]:
    """(importing module, imported module) → the places (file:line) of every import of ours."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    files = [*REPO.glob("kaapana_assets/**/*.py"), *REPO.glob("resources/**/*.py"),
             *REPO.glob("sensors/**/*.py"), REPO / "definitions.py"]
    for path in files:
        name, package = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                # `from kaapana_assets import nnunet` imports the package nnunet.
                targets = [f"{module}.{a.name}" if _is_module(f"{module}.{a.name}") else module for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in OURS:
                    found[(name, target)].append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_import_follows_the_table() -> None:
    wrong: dict[str, set[str]] = defaultdict(set)
    for (importer, imported), places in sorted(imports().items()):
        if importer.startswith(TOPS) or unit_of(importer) == unit_of(imported):
            continue
        if not may_import(unit_of(importer), unit_of(imported)):
            wrong[f"{unit_of(importer)} → {unit_of(imported)}"].update(places)
    assert not wrong, "imports against the layers (tests/test_layering.py, docs/architecture.md):\n" + "\n".join(
        f"{pair}: {', '.join(sorted(places))}" for pair, places in sorted(wrong.items()))


def test_the_table_names_every_package() -> None:
    """A new package gets its layer when it is added: nothing under kaapana_assets/ is unplaced."""
    units = {unit_of(_module_name(p)[0]) for p in REPO.glob("kaapana_assets/**/*.py")}
    placed = set(LAYER_OF) | DAGSTER | {u for u in units if u.endswith((".assets", ".steps"))}
    assert sorted(u for u in units - placed if not f"kaapana_assets.{u}".startswith(TOPS)) == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """What the table is checked with reads imports inside functions and relative ones."""
    source = "def f():\n    from kaapana_assets.client import api\n\nfrom .pipeline import x\n"
    tree = ast.parse(source)
    kinds = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert kinds == ["ImportFrom", "ImportFrom"]
    assert not may_import("lake", "client") and may_import("client", "lake")
    assert not may_import("resources", "ingest.assets") and may_import("sensors", "ingest.assets")
    assert not may_import("federated", "monitoring.steps") and may_import("federated.steps", "federated.assets")



def _imported_modules(source: str, package: str) -> list[tuple[str, int]]:
    """Every module `source` (a module of `package`) imports, absolute names (relative ones
    resolved), with its line; `from tests.network import test_network` names
    tests.network.test_network."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found += [(module, node.lineno)] + [(f"{module}.{a.name}", node.lineno) for a in node.names]
    return found


def test_tests_share_helpers_not_test_modules_and_bench_stands_apart() -> None:
    """A helper or fixture two test modules use lives in tests/helpers.py or a conftest.py: a
    test module imports no other test module (the helper would hide among tests, and its
    module's tests run wherever it is imported). bench/ imports nothing from tests/."""
    wrong = []
    for path in sorted([*REPO.glob("tests/**/*.py"), *REPO.glob("bench/**/*.py")]):
        in_bench = path.relative_to(REPO).parts[0] == "bench"
        for module, line in _imported_modules(path.read_text(), _module_name(path)[1]):
            parts = module.split(".")
            if parts[0] == "tests" and (in_bench or parts[-1].startswith("test_")) and _is_module(module):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert wrong == []


def test_the_test_import_check_sees_every_form_of_import() -> None:
    source = ("from tests.network.test_network import Receiver\nfrom tests.network import test_network\n"
              "def f():\n    from .test_network import storescu\n")
    found = _imported_modules(source, "tests.network")
    assert [m for m, _ in found if m.split(".")[-1].startswith("test_") and _is_module(m)] == [
        "tests.network.test_network", "tests.network.test_network", "tests.network.test_network"]
    assert [line for m, line in found if m == "tests.network.test_network"] == [1, 2, 4]
