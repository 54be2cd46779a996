"""The packages are layers, and imports only point down: core <- feedback <- (train | loop) <- serve
<- the CLI and `simulate` (the `tuneloop` package itself). `train` and `serve` never import each
other, nor does `train` import `loop`: a job is a process the loop starts, not a function it calls.
Imports inside functions count too."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = "tuneloop"

# What each layer may import, besides itself.
ALLOWED = {
    "core": set(),
    "feedback": {"core"},
    "train": {"core", "feedback"},
    "loop": {"core", "feedback"},
    "serve": {"core", "feedback", "loop"},
    TOP: {"core", "feedback", "train", "loop", "serve"},
}


def package_dirs() -> dict[str, Path]:
    """Layer name -> its folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {
        name.removeprefix(f"{TOP}.") if name != TOP else TOP: ROOT / d
        for name, d in mapping.items()
    }


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name; None when it is not tuneloop's, or is the bare package
    (whose `__init__` only reads the version, see
    `test_the_package_root_imports_nothing_but_the_version_reader`)."""
    parts = module.split(".")
    if parts[0] != TOP or len(parts) == 1:
        return None
    if len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return TOP


def imported_layers(path: Path) -> list[tuple[int, str]]:
    """(line, layer) of every tuneloop import in a file, top-level or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tuneloop import serve` names a layer as an attribute.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            layer = layer_of(name)
            if layer is not None:
                found.append((node.lineno, layer))
    return sorted(found)


def test_every_package_is_a_known_layer() -> None:
    assert set(package_dirs()) == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down(layer: str) -> None:
    folder = package_dirs()[layer]
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in sorted(folder.glob("*.py"))
        for line, target in imported_layers(path)
        if target != layer and target not in ALLOWED[layer]
    ]
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer])}:\n" + "\n".join(wrong)


def test_the_package_root_imports_nothing_but_the_version_reader() -> None:
    """Importing any layer runs the root's `__init__` first: it imports none of tuneloop's
    modules, and reads the version from the installed metadata only when asked."""
    tree = ast.parse((package_dirs()[TOP] / "__init__.py").read_text())
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else ",".join(a.name for a in n.names)
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    assert imported == ["importlib.metadata"]


def test_the_version_is_pyprojects() -> None:
    import tuneloop

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert tuneloop.__version__ == config["project"]["version"]


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from tuneloop.core.records import Message\n"
        "def f():\n    from tuneloop.serve.engine import EmbeddedEngine\n"
        "import tuneloop.cli\nfrom tuneloop import models\nimport tuneloop\nimport torch\n"
    )
    assert imported_layers(source) == [(1, "core"), (3, "serve"), (4, TOP), (5, TOP)]
