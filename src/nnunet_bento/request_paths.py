"""Every path a request names, resolved (symlinks followed) and checked against the path
roots before anything is read, so that a refusal never depends on what lies on the disk."""

from dataclasses import dataclass
from pathlib import Path

from .cascade import REFERENCE_FIELDS, earlier_stage
from .io.path_roots import STUDY_FIELD, PathRoots
from .stage import Stage


@dataclass(frozen=True)
class RequestPaths:
    """The resolved study, output folder, each stage's series and mask files."""

    study: Path
    output_dir: Path
    output_shown: str
    series: list[tuple[Path, ...]]
    masks: list[dict[str, Path]]

    def shown(self, message: str) -> str:
        """``message`` with server paths of the study named relative to study_path."""
        return (
            message.replace(f"{self.study}/", "")
            .replace(str(self.study), STUDY_FIELD)
            .replace(str(self.output_dir), "output_dir")
        )


def field_name(field: str, stage: int, n_stages: int, item: int | None = None) -> str:
    """How an error names a per-model field: ``series_folders[1]``, ``crop_from[0]``, ..."""
    name = field if n_stages == 1 else f"{field}[{stage}]"
    return name if item is None else f"{name}[{item}]"


def check_request_paths(
    roots: PathRoots, study_path: str, output_dir: str, stages: list[Stage]
) -> RequestPaths:
    """Resolve every path of the request; ForbiddenPathError (403) names the first that is
    outside its root or leaves the study."""
    study = roots.input_path(STUDY_FIELD, study_path)
    output = roots.output_path("output_dir", output_dir)
    series, masks = [], []
    for stage in stages:
        n = len(stages)
        series.append(
            tuple(
                roots.in_study(field_name("series_folders", stage.index, n, i), study, entry)
                for i, entry in enumerate(stage.settings.series_folders)
            )
        )
        files = {}
        for field in REFERENCE_FIELDS:
            name = getattr(stage.settings, field)
            if name is not None and earlier_stage(name) is None:
                files[field] = roots.in_study(field_name(field, stage.index, n), study, name)
        masks.append(files)
    return RequestPaths(study, output, roots.output_shown(output, output_dir), series, masks)
