"""The docs cover the code: every environment variable it reads, every route it serves, every
relative link resolves, and the README stays short. No server is started."""

import ast
import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIGURATION = DOCS / "configuration.md"
API = DOCS / "api.md"
PROBE_ROUTES = {("GET", "/readyz"), ("GET", "/livez"), ("GET", "/metrics"), ("GET", "/docs.json")}
SHELL_DEFAULT = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::?[-=])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
CONVERTOR = re.compile(r"\{(\w+):\w+\}")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def table_first_cells(path: Path) -> set[str]:
    """The first cell of every table row, without its backticks."""
    cells = set()
    for line in path.read_text().splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            cells.add(line.split("|")[1].strip().strip("`"))
    return cells


# Environment variables


def settings_variables() -> set[str]:
    from nnunet_bento.settings import ServeSettings

    return {name.upper() for name in ServeSettings.model_fields}


def _is_environ(node: ast.AST) -> bool:
    """`os.environ` or a bare `environ`."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ" and isinstance(node.value, ast.Name)
    return isinstance(node, ast.Name) and node.id == "environ"


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "text"` assignments."""
    constants = {}
    for statement in tree.body:
        value = statement.value if isinstance(statement, ast.Assign) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = value.value
    return constants


def _name_of(node: ast.AST, constants: dict[str, str]) -> str | None:
    """A variable name given as a string literal or a module constant; None when computed."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def python_reads(source: str) -> set[str]:
    """Names read by os.environ[...], os.environ.get/setdefault(...) and os.getenv(...)."""
    tree = ast.parse(source)
    constants = _string_constants(tree)
    names = set()
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if _is_environ(node.value):
                key = node.slice
        elif isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            func = node.func
            if func.attr in ("get", "setdefault") and _is_environ(func.value):
                key = node.args[0]
            elif func.attr == "getenv" and isinstance(func.value, ast.Name):
                key = node.args[0] if func.value.id == "os" else None
        name = _name_of(key, constants) if key is not None else None
        if name:
            names.add(name)
    return names


def shell_reads(source: str) -> set[str]:
    """Upper-case names a shell script reads with a default: ${NAME:-x}, ${NAME-x}, ${NAME:=x}."""
    code = "\n".join(
        line.split(" #")[0] for line in source.splitlines() if not line.lstrip().startswith("#")
    )
    return set(SHELL_DEFAULT.findall(code))


def is_shell_script(path: Path) -> bool:
    if path.suffix == ".sh":
        return True
    if path.suffix:
        return False
    first = path.read_text(errors="ignore").split("\n", 1)[0]
    return first.startswith("#!") and ("bash" in first or first.endswith("/sh"))


@cache
def code_variables() -> frozenset[str]:
    """Every environment variable that src/, service.py and scripts/ read."""
    names = settings_variables()
    python = [ROOT / "service.py", *(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    for path in python:
        names |= python_reads(path.read_text())
    for path in (ROOT / "scripts").rglob("*"):
        if path.is_file() and is_shell_script(path):
            names |= shell_reads(path.read_text())
    return frozenset(names)


def test_the_scan_finds_what_the_code_reads():
    found = code_variables()
    # One of each kind: a settings field, os.environ.get by constant, by literal, a shell default.
    for name in ("NNUNET_BENTO_API_TOKEN", "nnUNet_extTrainer", "NNUNET_BENTO_ENGINE", "IMAGE"):
        assert name in found
    assert python_reads("import os\nX = 'A'\nos.environ[X] = '1'\nos.getenv('B')\n") == {"B"}
    assert shell_reads('P=${PORT:-1}\n# ${NOT_ME:-x}\necho "${ARRAY[@]}" ${lower:-x}\n') == {"PORT"}


def test_every_environment_variable_is_documented():
    documented = table_first_cells(CONFIGURATION)
    missing = sorted(code_variables() - documented)
    assert not missing, f"docs/configuration.md has no table row for {missing}"


# Routes


@cache
def code_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route: the upload and job routes, the BentoML APIs (POST, and
    GET for those without inputs), the probes the guard leaves open, and the OpenAPI
    document."""
    from nnunet_bento.server.guard import OPEN_PATHS
    from nnunet_bento.server.job_routes import JOB_ROUTES
    from nnunet_bento.server.services import SegmentationServiceBase

    routes = set()
    for route in JOB_ROUTES:
        methods = getattr(route, "methods", None) or [route.method]
        path = CONVERTOR.sub(r"{\1}", route.path)  # /jobs/{job_id:job_id} -> /jobs/{job_id}
        routes |= {(method, path) for method in methods}
    for attribute in vars(SegmentationServiceBase).values():
        route = getattr(attribute, "route", None)
        if type(attribute).__name__ == "APIMethod" and isinstance(route, str):
            routes.add(("POST", route))
            if not attribute.input_spec.model_fields:  # served by GET too, as nnunet_serve's
                routes.add(("GET", route))
    return frozenset(routes | PROBE_ROUTES | {("GET", path) for path in OPEN_PATHS})


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) of the rows of docs/api.md's route table."""
    rows = set()
    for line in API.read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.split("|")[1:-1]]
        if len(cells) >= 2 and cells[0] in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            rows.add((cells[0], cells[1]))
    return rows


def test_the_route_scan_finds_every_kind_of_route():
    routes = code_routes()
    assert {("POST", "/infer"), ("POST", "/request-params"), ("POST", "/model_info")} <= routes
    assert ("DELETE", "/jobs/{job_id}") in routes


def test_every_route_is_documented():
    missing = sorted(code_routes() - documented_routes())
    assert not missing, f"docs/api.md's route table lacks {missing}"


# Links


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip())
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)
    ]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


def test_github_slugs():
    assert github_slug("Clinical-size cases (`scripts/bench/scale.py`)") == (
        "clinical-size-cases-scriptsbenchscalepy"
    )
    assert github_slug("On a server: `--url`") == "on-a-server---url"
    assert github_slug("The registry: `model-serve-spec.yaml`") == (
        "the-registry-model-serve-specyaml"
    )


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page.write_text(
        "# Page\n[ok](other.md#a-section) [self](#page) [web](https://example.org/x)\n"
        "[gone](missing.md) [bad](other.md#nowhere)\n```\n[in code](nothing.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading #nowhere in other.md",
    ]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert not broken_links(path)


# README


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; at most 150"
    first_screen = "\n".join(lines[:25])
    assert "scripts/demo" in first_screen
    assert "scripts/test" in first_screen
