"""What a DICOM SEG says about its segments: DCMQI JSON templates and the inline short form.

A template holds what dcmqi's ``itkimage2segimage`` reads (DCMQI ``seg-schema.json``, see
https://qiicr.org/dcmqi). Each of its segments becomes one item of the Segment Sequence,
following the Segment Description Macro (PS3.3 Table C.8.20-4), with an Algorithm
Identification Macro (PS3.3 Table 10-19) that names the model that made the output.
"""

import difflib
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import highdicom as hd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..errors import SpecError
from .dicom_source import AlgorithmIdentity

LongString = Annotated[str, StringConstraints(strict=True, max_length=64)]
CodeString = Annotated[str, StringConstraints(strict=True, max_length=16, pattern=r"^[A-Z0-9 _]*$")]
IntegerString = Annotated[
    str, StringConstraints(strict=True, max_length=12, pattern=r"^ *[+-]?[0-9]+ *$")
]
UniqueIdentifier = Annotated[
    str, StringConstraints(strict=True, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")
]
Channel = Annotated[int, Field(strict=True, ge=0, le=255)]
LabChannel = Annotated[int, Field(strict=True, ge=0, le=65535)]

#: CID 7150 category of anatomy, as DCMQI templates code it.
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
#: CID 7150 category of the CID 7159 "Lesion Segmentation Types", as DCMQI templates code it.
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")


class MetadataError(SpecError):
    """Segment metadata that does not validate; ``problems`` lists each bad key by its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.problems = problems


class _DcmqiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True)


class CodeItem(_DcmqiModel):
    """One coded concept: the DCMQI ``codeSequence`` (PS3.3 Table 8.8-1)."""

    value: LongString = Field(alias="CodeValue")
    scheme_designator: LongString = Field(alias="CodingSchemeDesignator")
    meaning: LongString = Field(alias="CodeMeaning")

    @classmethod
    def from_code(cls, code: Code) -> "CodeItem":
        """The item for a pydicom ``Code``."""
        return cls(value=code.value, scheme_designator=code.scheme_designator, meaning=code.meaning)

    def to_concept(self) -> hd.sr.CodedConcept:
        """The highdicom coded concept of this item."""
        return hd.sr.CodedConcept(self.value, self.scheme_designator, self.meaning)


class SegmentAttributes(_DcmqiModel):
    """One segment of a DCMQI template; ``label_id`` is the label value in our masks."""

    label_id: Annotated[int, Field(strict=True, ge=1)] = Field(alias="labelID")
    segment_description: Annotated[str, Field(strict=True)] | None = Field(
        None, alias="SegmentDescription"
    )
    segment_label: LongString | None = Field(None, alias="SegmentLabel")
    algorithm_type: hd.seg.SegmentAlgorithmTypeValues = Field(alias="SegmentAlgorithmType")
    algorithm_name: LongString | None = Field(None, alias="SegmentAlgorithmName")
    category: CodeItem = Field(alias="SegmentedPropertyCategoryCodeSequence")
    property_type: CodeItem = Field(alias="SegmentedPropertyTypeCodeSequence")
    property_type_modifier: CodeItem | None = Field(
        None, alias="SegmentedPropertyTypeModifierCodeSequence"
    )
    anatomic_region: CodeItem | None = Field(None, alias="AnatomicRegionSequence")
    anatomic_region_modifier: CodeItem | None = Field(None, alias="AnatomicRegionModifierSequence")
    display_rgb: tuple[Channel, Channel, Channel] | None = Field(
        None, alias="recommendedDisplayRGBValue"
    )
    display_cielab: tuple[LabChannel, LabChannel, LabChannel] | None = Field(
        None, alias="RecommendedDisplayCIELabValue"
    )
    tracking_id: Annotated[str, Field(strict=True)] | None = Field(None, alias="TrackingIdentifier")
    tracking_uid: UniqueIdentifier | None = Field(None, alias="TrackingUniqueIdentifier")

    @model_validator(mode="after")
    def _tracking_pair(self) -> "SegmentAttributes":
        if (self.tracking_id is None) != (self.tracking_uid is None):
            raise ValueError("TrackingIdentifier and TrackingUniqueIdentifier go together")
        if self.anatomic_region_modifier is not None and self.anatomic_region is None:
            raise ValueError("AnatomicRegionModifierSequence needs AnatomicRegionSequence")
        return self

    @property
    def label(self) -> str:
        """Segment Label (0062,0005): the template's, else its description or type meaning."""
        return self.segment_label or self.segment_description or self.property_type.meaning

    def display_color(self) -> hd.color.CIELabColor | None:
        """Recommended Display CIELab Value (0062,000D), from either template form."""
        if self.display_cielab is not None:
            return hd.color.CIELabColor.from_dicom_value(self.display_cielab)
        if self.display_rgb is not None:
            return hd.color.CIELabColor.from_rgb(*self.display_rgb)
        return None


class SegmentationMetadata(_DcmqiModel):
    """A DCMQI JSON metadata template (the format of dcmqi and pydicom-seg), validated."""

    schema_url: Annotated[str, Field(strict=True)] | None = Field(None, alias="@schema")
    content_creator_name: LongString | None = Field(None, alias="ContentCreatorName")
    clinical_trial_series_id: LongString | None = Field(None, alias="ClinicalTrialSeriesID")
    clinical_trial_time_point_id: LongString | None = Field(None, alias="ClinicalTrialTimePointID")
    clinical_trial_coordinating_center_name: LongString | None = Field(
        None, alias="ClinicalTrialCoordinatingCenterName"
    )
    content_label: CodeString | None = Field(None, alias="ContentLabel")
    content_description: LongString | None = Field(None, alias="ContentDescription")
    series_description: LongString | None = Field(None, alias="SeriesDescription")
    series_number: IntegerString | None = Field(None, alias="SeriesNumber")
    instance_number: IntegerString | None = Field(None, alias="InstanceNumber")
    body_part_examined: CodeString | None = Field(None, alias="BodyPartExamined")
    segment_attributes_file_mapping: list[Annotated[str, Field(strict=True)]] | None = Field(
        None, alias="segmentAttributesFileMapping", min_length=1
    )
    segment_attributes: list[Annotated[list[SegmentAttributes], Field(min_length=1)]] = Field(
        alias="segmentAttributes", min_length=1
    )

    @model_validator(mode="after")
    def _unique_label_ids(self) -> "SegmentationMetadata":
        first: dict[int, str] = {}
        for i, group in enumerate(self.segment_attributes):
            for j, segment in enumerate(group):
                where = f"segmentAttributes[{i}][{j}].labelID"
                if segment.label_id in first:
                    raise ValueError(
                        f"{where}: {segment.label_id} repeats {first[segment.label_id]}"
                    )
                first[segment.label_id] = where
        return self

    @property
    def segments(self) -> list[SegmentAttributes]:
        """All segments, the template's lists of lists flattened."""
        return [segment for group in self.segment_attributes for segment in group]

    @property
    def label_ids(self) -> list[int]:
        """The label values the template describes, ascending."""
        return sorted(segment.label_id for segment in self.segments)

    @classmethod
    def from_dcmqi(cls, obj: Mapping[str, Any], source: str = "metadata") -> "SegmentationMetadata":
        """Validate a DCMQI template object; raises MetadataError naming each bad key."""
        try:
            return cls.model_validate(obj, by_alias=True)
        except ValidationError as error:
            raise MetadataError(source, _problems(error)) from None

    @classmethod
    def from_inline(cls, obj: Mapping[str, Any]) -> "SegmentationMetadata":
        """The metadata of the inline short form (``InlineMetadata``), names coded in SNOMED CT."""
        try:
            inline = InlineMetadata.model_validate(obj)
        except ValidationError as error:
            raise MetadataError("inline metadata", _problems(error)) from None
        unknown = [
            f"segment_names[{label}]: {problem}"
            for label, name in inline.segment_names.items()
            if (problem := _unknown_name_problem(name)) is not None
        ]
        if unknown:
            raise MetadataError("inline metadata", unknown)
        return cls.from_dcmqi(inline.to_dcmqi(), "inline metadata")

    def to_dcmqi(self) -> dict[str, Any]:
        """The DCMQI JSON object of this metadata, as ``itkimage2segimage`` reads it."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class InlineMetadata(BaseModel):
    """The inline short form: an algorithm name and one name per label, coded in SNOMED CT."""

    model_config = ConfigDict(extra="forbid")

    algorithm_name: Annotated[str, Field(strict=True, min_length=1)]
    segment_names: dict[Annotated[int, Field(ge=1)], Annotated[str, Field(strict=True)]] = Field(
        min_length=1, description="Names of labels 1..n, or {label: name}."
    )
    series_description: Annotated[str, Field(strict=True)] | None = None
    body_part_examined: Annotated[str, Field(strict=True)] | None = None
    content_creator_name: Annotated[str, Field(strict=True)] | None = None
    series_number: int | None = None
    algorithm_type: hd.seg.SegmentAlgorithmTypeValues = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC

    @field_validator("segment_names", mode="before")
    @classmethod
    def _numbered_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {label: name for label, name in enumerate(value, start=1)}
        return value

    def to_dcmqi(self) -> dict[str, Any]:
        """The equivalent DCMQI template object."""
        optional = {
            "SeriesDescription": self.series_description,
            "BodyPartExamined": self.body_part_examined and self.body_part_examined.upper(),
            "ContentCreatorName": self.content_creator_name,
            "SeriesNumber": None if self.series_number is None else str(self.series_number),
        }
        segments = [
            self._segment(label, name) for label, name in sorted(self.segment_names.items())
        ]
        return {
            **{k: v for k, v in optional.items() if v is not None},
            "segmentAttributes": [segments],
        }

    def _segment(self, label: int, name: str) -> dict[str, Any]:
        code = snomed_code(name)
        return {
            "labelID": label,
            "SegmentLabel": name,
            "SegmentDescription": code.meaning,
            "SegmentAlgorithmType": self.algorithm_type.value,
            "SegmentAlgorithmName": self.algorithm_name,
            "SegmentedPropertyCategoryCodeSequence": _code_json(segment_category(code)),
            "SegmentedPropertyTypeCodeSequence": _code_json(code),
        }


def _code_json(code: Code) -> dict[str, str]:
    return CodeItem.from_code(code).model_dump(by_alias=True)


def _normalise(name: str) -> str:
    return "".join(name.split()).replace("_", "").replace("-", "").lower()


@cache
def _sct_concepts() -> dict[str, Code]:
    return codes.SCT.concepts


@cache
def _sct_keywords() -> dict[str, str]:
    return {_normalise(keyword): keyword for keyword in _sct_concepts()}


def _unknown_name_problem(name: str) -> str | None:
    keywords = _sct_keywords()
    if _normalise(name) in keywords:
        return None
    close = difflib.get_close_matches(_normalise(name), keywords, n=5, cutoff=0.75)
    hint = ", ".join(keywords[key] for key in close) or "none"
    return f"{name!r} is no SNOMED CT keyword of pydicom's codes.SCT; close matches: {hint}"


def snomed_code(name: str) -> Code:
    """The SNOMED CT code whose pydicom keyword is ``name``, ignoring case, spaces and _ or -."""
    if (problem := _unknown_name_problem(name)) is not None:
        raise SpecError(problem)
    return _sct_concepts()[_sct_keywords()[_normalise(name)]]


def segment_category(code: Code) -> Code:
    """Segmented Property Category (CID 7150) of a property type code: lesion or anatomy."""
    lesion_types = codes.cid7159.concepts.values()
    if any(code.value == lesion.value for lesion in lesion_types):
        return MORPHOLOGICALLY_ALTERED_STRUCTURE
    return ANATOMICAL_STRUCTURE


def _path(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _problem(error: Mapping[str, Any]) -> str:
    if error["type"] == "missing":
        return "missing"
    if error["type"] == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error"):
        return message
    return f"{message} (got {error['input']!r})"


def _problems(error: ValidationError) -> list[str]:
    return [
        f"{_path(item['loc'])}: {_problem(item)}" if item["loc"] else _problem(item)
        for item in error.errors()
    ]


def load_dcmqi_template(path: str | Path) -> SegmentationMetadata:
    """Read and validate a DCMQI JSON template; raises MetadataError (a SpecError)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MetadataError(str(path), [f"cannot read a JSON template: {error}"]) from None
    if not isinstance(obj, dict):
        raise MetadataError(str(path), ["a template is a JSON object"])
    return SegmentationMetadata.from_dcmqi(obj, str(path))


def load_metadata(value: str | Path | Mapping[str, Any]) -> SegmentationMetadata:
    """Metadata from a template path, an inline short form (``segment_names``) or a DCMQI object."""
    if isinstance(value, str | Path):
        return load_dcmqi_template(value)
    if "segment_names" in value:
        return SegmentationMetadata.from_inline(value)
    return SegmentationMetadata.from_dcmqi(value)


def validate_metadata(value: str | Path | Mapping[str, Any]) -> list[str]:
    """Problems of a template path or metadata object against the DCMQI schema; empty if fine."""
    try:
        load_metadata(value)
    except MetadataError as error:
        return error.problems
    return []


def algorithm_identification(identity: AlgorithmIdentity) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification (PS3.3 Table 10-19) naming the model tag and checkpoint."""
    return hd.AlgorithmIdentificationSequence(
        name=identity.name,
        family=codes.DCM.ArtificialIntelligence,
        version=identity.version,
        parameters={
            "model_tag": identity.model_tag,
            "checkpoint_sha256": identity.checkpoint_sha256,
        },
    )


def _segment_description(
    number: int, segment: SegmentAttributes, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.label,
        segmented_property_category=segment.category.to_concept(),
        segmented_property_type=segment.property_type.to_concept(),
        algorithm_type=segment.algorithm_type,
        algorithm_identification=algorithm,
        tracking_id=segment.tracking_id,
        tracking_uid=segment.tracking_uid,
        anatomic_regions=None
        if segment.anatomic_region is None
        else [segment.anatomic_region.to_concept()],
        display_color=segment.display_color(),
    )
    if segment.segment_description is not None:
        description.SegmentDescription = segment.segment_description
    if segment.algorithm_name is not None:
        description.SegmentAlgorithmName = segment.algorithm_name
    if segment.property_type_modifier is not None:
        property_type = description.SegmentedPropertyTypeCodeSequence[0]
        property_type.SegmentedPropertyTypeModifierCodeSequence = [
            segment.property_type_modifier.to_concept()
        ]
    if segment.anatomic_region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            segment.anatomic_region_modifier.to_concept()
        ]
    return description


def segment_descriptions(
    metadata: SegmentationMetadata, labels: list[int], identity: AlgorithmIdentity
) -> list[hd.seg.SegmentDescription]:
    """Segment Sequence items (PS3.3 Table C.8.20-4) numbered 1..n for ``labels`` in order."""
    by_label = {segment.label_id: segment for segment in metadata.segments}
    missing = [label for label in labels if label not in by_label]
    if missing:
        raise ValueError(
            f"labels: the metadata has no segment for label(s) {missing} "
            f"(its labelIDs: {metadata.label_ids})"
        )
    algorithm = algorithm_identification(identity)
    return [
        _segment_description(number, by_label[label], algorithm)
        for number, label in enumerate(labels, start=1)
    ]
