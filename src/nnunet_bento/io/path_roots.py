"""Path roots: the folders a request may read from and write to, and the checks that keep
every request path inside them (symlinks followed, '..' resolved).

Refusals name the request field, never the value or the resolved server path.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from nnunet_bento.errors import ForbiddenPathError, RequestError

STUDY_FIELD = "study_path"


def _folder(value: str) -> Path:
    """Resolve one configured root folder."""
    return Path(value.strip()).expanduser().resolve()


def _input_roots(value: str | None) -> tuple[Path, ...] | None:
    """Split a ':'-joined setting into resolved folders; None or blank means unrestricted."""
    if value is None or not value.strip():
        return None
    return tuple(_folder(part) for part in value.split(":") if part.strip())


def _output_root(value: str | None) -> Path | None:
    """Resolve the output root setting; None or blank means unrestricted."""
    return _folder(value) if value is not None and value.strip() else None


def _require_value(field: str, value: str) -> None:
    """Refuse an empty path or one with a NUL byte (HTTP 400)."""
    if not value:
        raise RequestError(f"{field}: path is empty")
    if "\0" in value:
        raise RequestError(f"{field}: path contains a NUL byte")


def _resolve(field: str, path: Path) -> Path:
    """Resolve a path, following symlinks; it need not exist."""
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError):
        raise RequestError(f"{field}: path cannot be resolved") from None


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    """True when a resolved path equals one of the roots or lies below it."""
    return any(path.is_relative_to(root) for root in roots)


@dataclass(frozen=True)
class PathRoots:
    """Resolved folders that request paths must lie in; None means unrestricted (local use).

    Work roots (uploads, pulled series) are our own folders: always allowed for input and output.
    """

    input_roots: tuple[Path, ...] | None
    output_root: Path | None
    work_roots: tuple[Path, ...] = ()

    @classmethod
    def from_settings(
        cls, input_roots: str | None, output_root: str | None, work_roots: Sequence[Path] = ()
    ) -> Self:
        """Build from settings: input roots joined by ':', one output root; resolved once here."""
        return cls(
            input_roots=_input_roots(input_roots),
            output_root=_output_root(output_root),
            work_roots=tuple(Path(root).resolve() for root in work_roots),
        )

    @property
    def unrestricted(self) -> bool:
        """True when neither inputs nor outputs are confined to roots."""
        return self.input_roots is None and self.output_root is None

    def input_path(self, field: str, value: str) -> Path:
        """Resolve a request's input path; it must lie in an input root or a work root."""
        _require_value(field, value)
        path = _resolve(field, Path(value))
        if self.input_roots is not None and not _inside(path, self.input_roots + self.work_roots):
            raise ForbiddenPathError(f"{field}: path is outside the allowed input roots")
        return path

    def output_path(self, field: str, value: str) -> Path:
        """Resolve a request's output path; it must lie in the output root or a work root."""
        _require_value(field, value)
        path = _resolve(field, Path(value))
        if self.output_root is not None and not _inside(path, (self.output_root, *self.work_roots)):
            raise ForbiddenPathError(f"{field}: path is outside the allowed output root")
        return path

    def output_shown(self, resolved: Path, value: str) -> str:
        """How errors name an output folder: relative to the output root, else (no root, or
        one of our work folders) as given."""
        if self.output_root is None or not resolved.is_relative_to(self.output_root):
            return value
        relative = resolved.relative_to(self.output_root).as_posix()
        return f"{relative} (under the output root)" if relative != "." else "the output root"

    def in_study(self, field: str, study: Path, entry: str) -> Path:
        """Resolve an entry of a resolved study folder (relative to it, or absolute); it must
        stay inside the study."""
        _require_value(field, entry)
        path = _resolve(field, study / entry)
        if not path.is_relative_to(study):
            raise ForbiddenPathError(f"{field}: path leaves {STUDY_FIELD}")
        return path
