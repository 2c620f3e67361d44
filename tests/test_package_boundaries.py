"""The format packages (features, checkpoints) import none of the stages that use them, so the
late stages read them without the training loop (that evaluation and export import no
`lumos.training` is tests/test_import_graph.py's). Read from the source (every `import`
statement, also those inside functions), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lumos

SRC = Path(lumos.__file__).parent

# package -> packages it must never import (nor any module under them)
FORBIDDEN = {
    "lumos.features": ("lumos.training", "lumos.evaluation", "lumos.export"),
    "lumos.checkpoints": ("lumos.training", "lumos.evaluation", "lumos.export"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_what_it_must_not(package):
    files = sorted((SRC / package.removeprefix("lumos.").replace(".", "/")).rglob("*.py"))
    assert files, f"{package} has no modules"
    bad = [
        f"{path.relative_to(SRC.parent)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_lazy_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lumos.training.train import train\n")
    assert "lumos.training.train" in imported_modules(module)
