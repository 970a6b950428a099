"""Atomic outputs: files are written to a hidden folder in output_dir and moved when complete."""

import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from ..errors import RequestError


class OutputStaging:
    """Collects a request's files in ``output_dir/.staging-<id>/`` and moves them on commit.

    Nothing appears under the final names until every file is written; a failure removes the
    staging folder and leaves earlier outputs as they were.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RequestError(f"cannot create output_dir {self.output_dir}: {error}") from None
        self.staging_dir = self.output_dir / f".staging-{uuid.uuid4().hex}"
        self.staging_dir.mkdir()
        self.relative_paths: list[Path] = []

    def path(self, relative: str | Path) -> Path:
        """Where to write the file that will end up at ``output_dir/relative``."""
        relative = Path(relative)
        self.relative_paths.append(relative)
        target = self.staging_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def final_path(self, relative: str | Path) -> Path:
        return self.output_dir / relative

    def commit(self) -> None:
        """Move every file that was written to its final name (each move is atomic)."""
        for relative in self.relative_paths:
            if not (self.staging_dir / relative).exists():
                continue
            final = self.final_path(relative)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging_dir / relative, final)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def __enter__(self) -> "OutputStaging":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
