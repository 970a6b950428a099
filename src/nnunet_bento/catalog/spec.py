"""model-serve-spec.yaml -> a typed, validated registry description."""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config_file import read_config_file
from ..errors import SpecError


class MetadataPath(BaseModel):
    """A DCMQI JSON metadata template on disk."""

    model_config = ConfigDict(extra="allow")

    path: Path


class ModelEntry(BaseModel):
    """One registry model, named by a Bento model tag, a rel_path or a TotalSegmentator task."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Identifier used in requests (`nnunet_id`).")
    name: str | None = Field(None, description="User-facing name; also accepted as `nnunet_id`.")
    aliases: list[str] = Field(default_factory=list, description="More names for `nnunet_id`.")
    tag: str | None = Field(None, description="Bento model tag, e.g. `organ:latest`.")
    rel_path: str | None = Field(
        None, description="Path, or substring of a path, of the result folder under model_folder."
    )
    totalseg_task: str | None = Field(
        None, description="TotalSegmentator task, e.g. total_fastest."
    )
    metadata: MetadataPath | dict[str, Any] | None = Field(
        None,
        union_mode="left_to_right",
        description="DICOM export metadata: {path: template.json} or an inline object.",
    )
    fractional_metadata: MetadataPath | dict[str, Any] | None = Field(
        None,
        union_mode="left_to_right",
        description="Metadata of the fractional SEG (and of its bins with "
        "fractional_as_segments); defaults to metadata.",
    )
    empty_segment_metadata: MetadataPath | dict[str, Any] | None = Field(
        None,
        union_mode="left_to_right",
        description="Metadata of the SEG written when a prediction is empty; without it, an "
        "empty prediction writes no SEG.",
    )
    min_mem: int = Field(0, ge=0, description="Free GPU memory (MiB) needed before a run starts.")
    default_args: dict[str, Any] = Field(
        default_factory=dict, description="Defaults for this model's request parameters."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelEntry":
        sources = [s for s in ("tag", "rel_path", "totalseg_task") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of tag, rel_path or totalseg_task"
                + (f" (found {', '.join(sources)})" if sources else "")
            )
        return self

    def metadata_fields(self) -> dict[str, MetadataPath | dict[str, Any] | None]:
        """The DICOM metadata fields of the entry, by field name."""
        return {
            "metadata": self.metadata,
            "fractional_metadata": self.fractional_metadata,
            "empty_segment_metadata": self.empty_segment_metadata,
        }

    @property
    def names(self) -> list[str]:
        """Every name that selects this model in a request."""
        return [self.id, *([self.name] if self.name else []), *self.aliases]


class ServeSpec(BaseModel):
    """The whole registry file."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_folder: Path | None = Field(
        None, description="Folder that rel_path entries and TotalSegmentator weights live under."
    )
    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique_and_sources_complete(self) -> "ServeSpec":
        owners: dict[str, str] = {}
        for entry in self.models:
            for name in dict.fromkeys(entry.names):
                if name in owners:
                    raise ValueError(
                        f"model {entry.id!r}: name {name!r} is already used by model "
                        f"{owners[name]!r}"
                    )
                owners[name] = entry.id
            if entry.rel_path and self.model_folder is None:
                raise ValueError(f"model {entry.id!r}: rel_path needs a top-level model_folder")
        return self


def _describe_location(raw: Any, location: tuple[int | str, ...]) -> str:
    """'model 'organ', field 'min_mem'' for a pydantic error location."""
    if len(location) >= 2 and location[0] == "models" and isinstance(location[1], int):
        try:
            model_id = raw["models"][location[1]].get("id", f"#{location[1]}")
        except (AttributeError, IndexError, KeyError, TypeError):
            model_id = f"#{location[1]}"
        fields = ".".join(str(part) for part in location[2:])
        return f"model {model_id!r}" + (f", field {fields!r}" if fields else "")
    return "field " + repr(".".join(str(part) for part in location)) if location else "spec"


def parse_spec(raw: Any, source: str) -> ServeSpec:
    """Validate a loaded YAML document; errors name the model and the field."""
    try:
        return ServeSpec.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{_describe_location(raw, tuple(problem['loc']))}: {problem['msg']}"
            for problem in error.errors()
        )
        raise SpecError(f"{source}: {problems}") from None


def load_spec(path: Path) -> ServeSpec:
    """Read and validate a spec file; relative paths in it are taken from its own folder."""
    path = Path(path)
    spec = parse_spec(read_config_file(path, "model serve spec", "MODEL_SERVE_SPEC"), str(path))
    base = path.resolve().parent
    if spec.model_folder is not None and not spec.model_folder.is_absolute():
        spec.model_folder = base / spec.model_folder
    for entry in spec.models:
        for metadata in entry.metadata_fields().values():
            if isinstance(metadata, MetadataPath) and not metadata.path.is_absolute():
                metadata.path = base / metadata.path
    return spec
