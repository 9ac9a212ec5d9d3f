"""Import hygiene: the pure maths stays light, and every public name resolves, lazily and for type checkers."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lit_echo
import lit_echo.online

PACKAGES = [lit_echo, lit_echo.online]


def _modules_loaded_by(statement: str) -> set[str]:
    """Top-level module names in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("statement", ["import lit_echo.losses", "import lit_echo.logprobs",
                                       "import lit_echo.advantages", "import lit_echo"])
def test_the_maths_and_the_package_import_without_lightning_or_transformers(statement):
    loaded = _modules_loaded_by(statement)
    assert "lit_echo" in loaded
    assert not loaded & {"lightning", "pytorch_lightning", "transformers", "peft", "bitsandbytes"}, loaded


# The pure-torch maths layer: no model library and no module above it, not even inside a function.
MATHS = ("losses", "logprobs", "advantages", "paw", "schedules", "entropy_guard", "roles", "metrics",
         "distributed")
ABOVE_THE_MATHS = ("lit_echo.models", "lit_echo.module", "lit_echo.pretrained", "lit_echo.cli", "lit_echo.online",
                   "lit_echo.data", "transformers", "peft", "bitsandbytes", "lightning")


def _imported_names(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` anywhere in the file names (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", MATHS)
def test_the_maths_layer_imports_nothing_above_it_even_lazily(name):
    names = _imported_names(Path(lit_echo.__file__).parent / f"{name}.py")
    above = {n for n in names if any(n == a or n.startswith(a + ".") for a in ABOVE_THE_MATHS)}
    assert not above, f"lit_echo/{name}.py imports {sorted(above)}"


def test_the_check_sees_a_heavy_import():
    # The same probe must notice a heavy import when one happens, or the test above could not fail.
    assert {"lightning", "transformers"} <= _modules_loaded_by("import lit_echo.module")


def _type_checking_imports(module) -> dict[str, str]:
    """``{name: module path}`` of the ``from X import name as name`` lines under ``if TYPE_CHECKING:``."""
    tree = ast.parse(inspect.getsource(module))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.dump(stmt)
                for alias in stmt.names:
                    assert alias.asname == alias.name, f"{alias.name}: write `{alias.name} as {alias.name}`"
                    found[alias.name] = stmt.module
    return found


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_name_resolves_to_the_declared_module(package):
    for name in package.__all__:
        value: Any = getattr(package, name)
        assert name in package._EXPORTS[value.__module__], name
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_type_checker_imports_match_the_lazy_exports(package):
    declared = {name: module for module, names in package._EXPORTS.items() for name in names}
    assert _type_checking_imports(package) == declared


def test_dir_lists_the_public_api():
    assert set(lit_echo.__all__) <= set(dir(lit_echo))


def test_py_typed_marker_is_packaged():
    # PEP 561: without the marker, type checkers ignore the package's annotations.
    assert (Path(lit_echo.__file__).parent / "py.typed").is_file()
    assert "py.typed" in (Path(__file__).parents[1] / "pyproject.toml").read_text()
