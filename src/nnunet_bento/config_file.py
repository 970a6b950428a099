"""Configuration files (YAML) that the server reads at start-up: a missing file or bad YAML is
a SpecError that names the file and the variable that points to it."""

from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError


def read_config_file(path: Path, what: str, variable: str) -> Any:
    """The YAML document in ``path`` (``what`` names the file for the operator)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{what} {path} does not exist; set {variable} to it")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from None
