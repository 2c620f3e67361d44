"""The import graph: configs cost what pydantic costs, and the stages depend on each other one way.

Imports are checked where they happen: each config module in a fresh interpreter (`sys.modules`
after importing it, and after the CLI's `config show` / `config schema`), and the package
dependencies statically, with `ast` over the source files (imports inside functions count too:
a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LUMOS = SRC / "lumos"
# What a config must never pull in: these cost seconds to import and need the GPU image's wheels.
HEAVY = ("torch", "accelerate", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript")
CONFIG_MODULES = (
    "lumos.config",
    *sorted(f"lumos.configs.{p.stem}" for p in (LUMOS / "configs").glob("*.py")),
    "lumos.deploy.config",
)


def _modules_after(code: str) -> set[str]:
    """The top-level package names in `sys.modules` after running `code` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(done.stderr.strip().splitlines()[-1])}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m in HEAVY or m.startswith("onnx"))


def test_every_config_module_is_listed() -> None:
    assert "lumos.configs.training" in CONFIG_MODULES and "lumos.configs.k8s" in CONFIG_MODULES


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_a_config_module_imports_no_torch(module: str) -> None:
    assert not _heavy(_modules_after(f"import {module}")), f"{module} imports heavy packages"


@pytest.mark.parametrize("action", ["show", "schema"])
def test_lumos_config_imports_no_torch(action: str) -> None:
    """`lumos config show --preset xl` / `lumos config schema`: the whole CLI path, presets
    loaded and validated (validators may import their helpers when they run)."""
    code = (
        "import contextlib, io\n"
        "from lumos.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main(['config', '{action}', '--preset', 'xl'])"
    )
    assert not _heavy(_modules_after(code))


def _imported(path: Path) -> set[str]:
    """Every module a source file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _importers_of(packages: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    """`file: module` for each import of a `targets` module in the files of `packages`."""
    out = []
    for package in packages:
        for path in sorted((LUMOS / package).rglob("*.py")):
            for name in sorted(_imported(path)):
                if any(name == t or name.startswith(f"{t}.") for t in targets):
                    out.append(f"{path.relative_to(SRC)}: {name}")
    return out


def test_the_static_check_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lumos.training.data import x\n    import lumos.k8s\n")
    assert {"lumos.training.data", "lumos.k8s"} <= _imported(source)


def test_configs_do_not_import_the_stages_that_read_them() -> None:
    """The configs are a leaf: `lumos.k8s` reads `lumos.config`, so a config importing `lumos.k8s`
    (or the pipeline config) would be the config <-> k8s cycle again."""
    targets = ("lumos.config", "lumos.k8s", "lumos.pipeline", "lumos.cli", "lumos.deploy")
    assert _importers_of(("configs",), targets) == []
    config_py = [n for n in _imported(LUMOS / "config.py") if n.startswith("lumos.")]
    assert all(n.startswith(("lumos.configs", "lumos.errors")) for n in config_py), config_py


def test_evaluation_and_export_do_not_import_training() -> None:
    """Checkpoints and features are formats with packages of their own: evaluation and export
    read them there, never through the training stage."""
    assert _importers_of(("evaluation", "export"), ("lumos.training",)) == []
