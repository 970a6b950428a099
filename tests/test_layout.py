"""The layout's rules: only the doors and the model store import BentoML, and only one
function touches BentoML's private modules."""

import ast
import importlib.metadata
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nnunet_bento"
DOORS = ("server", "cli")
STORE = PACKAGE / "catalog" / "store.py"
PRIVATE = ("_bentoml_impl", "bentoml._internal")


def imported_modules(path: Path) -> list[tuple[str, ast.AST]]:
    """Every module an import statement in ``path`` names, with the statement."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node))
    return found


def test_only_doors_and_store_import_bentoml():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        is_door = relative.parts[0] in DOORS or relative.name == "client.py"
        allowed = path.name != "__init__.py" and (is_door or path == STORE)
        for module, _ in imported_modules(path):
            if module.split(".")[0] in ("bentoml", "_bentoml_impl") and not allowed:
                offenders.append(f"{relative}: {module}")
    assert offenders == []


def test_private_bentoml_modules_are_imported_in_one_function_only():
    places = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PRIVATE):
                    places.append(f"{path.relative_to(PACKAGE)}:{function.name}")
    module_level = [
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in PACKAGE.rglob("*.py")
        for module, node in imported_modules(path)
        if module.startswith(PRIVATE) and node.col_offset == 0
    ]
    assert module_level == []
    assert sorted(set(places)) == [
        "server/routes.py:bentoml_metrics",
        "server/serve_one.py:serve_service",
    ]


def test_bentoml_private_serving_api_still_has_what_serve_one_calls():
    """Fails loudly when a BentoML release moves or changes the functions serve_one uses."""
    from _bentoml_impl.server.serving import serve_http
    from bentoml._internal.service.loader import load

    serve_parameters = inspect.signature(serve_http).parameters
    for name in ("bento_identifier", "host", "port", "service_name", "dependency_map"):
        assert name in serve_parameters, f"serve_http lost its {name!r} parameter"
    load_parameters = inspect.signature(load).parameters
    assert {"bento_identifier", "working_dir"} <= set(load_parameters)


def loaded_bentoml_after(code: str, cwd: Path | None = None) -> list[str]:
    """The bentoml modules loaded once ``code`` has run in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if 'bentoml' in m))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, check=True
    )
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module",
    ["nnunet_bento.pipeline", "nnunet_bento.server", "nnunet_bento.cli", "nnunet_bento.catalog"],
)
def test_importing_the_library_or_a_door_package_loads_no_bentoml(module):
    assert loaded_bentoml_after(f"import {module}") == []


def test_cli_predict_on_a_model_folder_loads_no_bentoml(demo_model_dirs, demo_study, tmp_path):
    code = (
        "from nnunet_bento.cli.main import main\n"
        f"assert main(['predict', '-i', {str(demo_study / 'T2')!r}, "
        f"'-m', {str(demo_model_dirs['organ2d'])!r}, '-o', {str(tmp_path / 'out')!r}]) == 0"
    )
    assert loaded_bentoml_after(code, cwd=tmp_path) == []
    assert (tmp_path / "out" / "prediction.nii.gz").is_file()


def test_every_direct_import_is_a_declared_dependency():
    project = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["totalseg"]]
    declared = {canonical(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0]) for line in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for path in PACKAGE.rglob("*.py"):
        for module, _ in imported_modules(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "nnunet_bento":
                continue
            if not {canonical(name) for name in distributions.get(top, [top])} & declared:
                undeclared.append(f"{path.relative_to(PACKAGE)}: {top}")
    assert undeclared == []


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
