"""The tree keeps the shape ARCHITECTURE.md describes: dependencies point one way, the
library never imports its test kit, modules and classes stay small, examples use only
public names, and every config field is described."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import datagen

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "datagen"

# the layers, top to bottom; a module may import its own layer and the ones below it
TOP = {"datagen.cli", "datagen.folder", "datagen.scaffold"}
PIPELINE = {"datagen.pipeline", "datagen.prepare", "datagen.streaming", "datagen.plans",
            "datagen.estimate", "datagen.builder"}
EXECUTORS = "datagen.executors"
ENGINE = "datagen.engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every datagen module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("datagen")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.startswith("datagen"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(name: str) -> int:
    if any(name == t or name.startswith(t + ".") for t in TOP):
        return 4
    if name in PIPELINE:
        return 3
    if name.startswith(EXECUTORS):
        return 2
    if name.startswith(ENGINE):
        return 1
    return 0  # plan types, llm, store, extract, prompts, pool, config, ...


def real_imports(name: str) -> set[str]:
    """The datagen modules (not names inside them) a module imports."""
    out = set()
    for imported in imports_of(MODULES[name]):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported and imported != "datagen":
            out.add(imported)
    return out


# the package root is the public facade: it names everything, lazily
LIBRARY = sorted(n for n in MODULES if not n.startswith("datagen.testing") and n != "datagen")


@pytest.mark.parametrize("name", LIBRARY)
def test_dependencies_point_down(name: str) -> None:
    for imported in real_imports(name):
        if imported.startswith("datagen.testing"):
            pytest.fail(f"{name} imports the test kit ({imported})")
        assert layer(imported) <= layer(name), (
            f"{name} (layer {layer(name)}) imports {imported} (layer {layer(imported)}): "
            "dependencies point down only (ARCHITECTURE.md)")


def test_the_dry_run_and_the_plans_never_import_the_engine_runner() -> None:
    for name in ("datagen.estimate", "datagen.plans", "datagen.plan"):
        engine = {m for m in real_imports(name) if m.startswith(ENGINE)}
        assert not engine, f"{name} imports {engine}"


def test_the_library_names_no_test_provider() -> None:
    for name in LIBRARY:
        source = MODULES[name].read_text()
        assert '"fake"' not in source and "'fake'" not in source, name


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_modules_and_classes_are_small(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= 400, f"{path}: {lines} lines (at most 400)"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= 220, f"{path}: class {node.name} is {size} lines (~200 at most)"


PUBLIC_USERS = [*sorted(ROOT.glob("examples/*/*.py")),
                *sorted((PACKAGE / "scaffold" / "template").glob("*.py"))]


@pytest.mark.parametrize("path", PUBLIC_USERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_examples_use_only_public_names(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("datagen"):
            assert node.module == "datagen", f"{path}: imports from {node.module}"
            for alias in node.names:
                assert alias.name in datagen.__all__, f"{path}: datagen.{alias.name}"


def test_every_public_name_resolves() -> None:
    for name in datagen.__all__:
        assert getattr(datagen, name) is not None, name


def test_every_config_field_is_described() -> None:
    from datagen.config.schema import SECTIONS, Settings

    for cls in [Settings, *SECTIONS.values()]:
        for field_name, info in cls.model_fields.items():
            if field_name == "config_path":
                continue
            assert info.description, f"{cls.__name__}.{field_name} has no description"
