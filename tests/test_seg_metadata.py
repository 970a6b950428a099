"""Segment metadata: DCMQI templates, the inline short form, SNOMED CT lookup, validation."""

import json
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from nnunet_bento.errors import SpecError
from nnunet_bento.io.dicom_source import AlgorithmIdentity
from nnunet_bento.io.seg_metadata import (
    SegmentationMetadata,
    load_dcmqi_template,
    load_metadata,
    segment_descriptions,
    snomed_code,
    validate_metadata,
)

IDENTITY = AlgorithmIdentity(
    name="nnU-Net organ", version="0.1.0", model_tag="organ:k3xq2", checkpoint_sha256="ab" * 32
)


def code(value: str, meaning: str, scheme: str = "SCT") -> dict[str, str]:
    return {"CodeValue": value, "CodingSchemeDesignator": scheme, "CodeMeaning": meaning}


def dcmqi_template() -> dict:
    """A template as the qiicr.org/dcmqi generator writes one: prostate, bladder, kidney, lesion."""
    anatomy = code("123037004", "Anatomical Structure")
    return {
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/seg-schema.json#",
        "ContentCreatorName": "Reader1",
        "ClinicalTrialSeriesID": "Session1",
        "ClinicalTrialTimePointID": "1",
        "ClinicalTrialCoordinatingCenterName": "dcmqi",
        "SeriesDescription": "Organ segmentation",
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "BodyPartExamined": "PELVIS",
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "Image segmentation",
        "segmentAttributes": [
            [
                {
                    "labelID": 1,
                    "SegmentDescription": "Prostate gland",
                    "SegmentLabel": "Prostate",
                    "SegmentAlgorithmType": "AUTOMATIC",
                    "SegmentAlgorithmName": "nnU-Net prostate",
                    "SegmentedPropertyCategoryCodeSequence": anatomy,
                    "SegmentedPropertyTypeCodeSequence": code("41216001", "Prostate"),
                    "recommendedDisplayRGBValue": [230, 158, 140],
                },
                {
                    "labelID": 2,
                    "SegmentDescription": "Urinary bladder",
                    "SegmentLabel": "Bladder",
                    "SegmentAlgorithmType": "AUTOMATIC",
                    "SegmentAlgorithmName": "nnU-Net prostate",
                    "SegmentedPropertyCategoryCodeSequence": anatomy,
                    "SegmentedPropertyTypeCodeSequence": code("89837001", "Bladder"),
                    "AnatomicRegionSequence": code("12921003", "Pelvis"),
                    "recommendedDisplayRGBValue": [222, 154, 132],
                },
                {
                    "labelID": 3,
                    "SegmentLabel": "Left kidney",
                    "SegmentAlgorithmType": "AUTOMATIC",
                    "SegmentAlgorithmName": "nnU-Net prostate",
                    "SegmentedPropertyCategoryCodeSequence": anatomy,
                    "SegmentedPropertyTypeCodeSequence": code("64033007", "Kidney"),
                    "SegmentedPropertyTypeModifierCodeSequence": code("7771000", "Left"),
                    "recommendedDisplayRGBValue": [185, 102, 83],
                },
            ],
            [
                {
                    "labelID": 5,
                    "SegmentDescription": "Suspicious lesion",
                    "SegmentLabel": "Lesion",
                    "SegmentAlgorithmType": "AUTOMATIC",
                    "SegmentAlgorithmName": "nnU-Net prostate",
                    "SegmentedPropertyCategoryCodeSequence": code(
                        "49755003", "Morphologically Altered Structure"
                    ),
                    "SegmentedPropertyTypeCodeSequence": code("52988006", "Lesion"),
                    "AnatomicRegionSequence": code("41216001", "Prostate"),
                    "recommendedDisplayRGBValue": [255, 0, 0],
                }
            ],
        ],
    }


def bad_template() -> dict:
    template = dcmqi_template()
    segments = template["segmentAttributes"][0]
    del segments[1]["SegmentedPropertyTypeCodeSequence"]["CodeValue"]
    segments[0]["SegmentAlgorithmType"] = "automatic"
    segments[2]["recommendedDisplayRGBValue"] = [185, 102, 256]
    segments[2]["Colour"] = "red"
    template["SeriesNumber"] = 300
    template["BodyPartExamined"] = "pelvis"
    return template


def test_dcmqi_template_loads_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "template.json"
    path.write_text(json.dumps(dcmqi_template()))
    metadata = load_dcmqi_template(path)
    assert validate_metadata(path) == []
    assert metadata.label_ids == [1, 2, 3, 5]
    assert metadata.series_description == "Organ segmentation"
    assert metadata.segments[3].category.value == "49755003"
    assert metadata.to_dcmqi() == dcmqi_template()


def test_segment_descriptions_follow_the_template_and_name_the_model() -> None:
    metadata = SegmentationMetadata.from_dcmqi(dcmqi_template())
    bladder, kidney, lesion = segment_descriptions(metadata, [2, 3, 5], IDENTITY)
    assert [d.SegmentNumber for d in (bladder, kidney, lesion)] == [1, 2, 3]
    assert [d.SegmentLabel for d in (bladder, kidney, lesion)] == [
        "Bladder",
        "Left kidney",
        "Lesion",
    ]
    assert bladder.SegmentDescription == "Urinary bladder"
    assert bladder.SegmentAlgorithmName == "nnU-Net prostate"
    assert bladder.AnatomicRegionSequence[0].CodeValue == "12921003"
    assert bladder.SegmentedPropertyTypeCodeSequence[0].CodeValue == "89837001"
    modifier = kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    assert modifier[0].CodeValue == "7771000"
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    expected_lab = hd.color.CIELabColor.from_rgb(255, 0, 0).value
    assert tuple(lesion.RecommendedDisplayCIELabValue) == tuple(expected_lab)
    for description in (bladder, kidney, lesion):
        (algorithm,) = description.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "nnU-Net organ"
        assert algorithm.AlgorithmVersion == "0.1.0"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert "model_tag=organ:k3xq2" in algorithm.AlgorithmParameters
        assert f"checkpoint_sha256={'ab' * 32}" in algorithm.AlgorithmParameters


def test_segment_descriptions_name_a_label_the_template_lacks() -> None:
    metadata = SegmentationMetadata.from_dcmqi(dcmqi_template())
    with pytest.raises(ValueError, match=r"labels: .*\[4\]"):
        segment_descriptions(metadata, [1, 4], IDENTITY)


@pytest.mark.parametrize(
    ("name", "value", "category"),
    [
        ("prostate", "41216001", "123037004"),
        ("Bladder", "89837001", "123037004"),
        ("lesion", "52988006", "49755003"),
        ("seminal vesicle", "64739004", "123037004"),
        ("Seminal_Vesicle", "64739004", "123037004"),
        ("NEOPLASM", "108369006", "49755003"),
    ],
)
def test_inline_names_become_snomed_codes(name: str, value: str, category: str) -> None:
    metadata = SegmentationMetadata.from_inline(
        {"algorithm_name": "nnU-Net organ", "segment_names": [name]}
    )
    (segment,) = metadata.segments
    assert segment.property_type.value == value
    assert segment.property_type.scheme_designator == "SCT"
    assert segment.category.value == category
    assert segment.label == name
    assert segment.algorithm_name == "nnU-Net organ"
    assert snomed_code(name).value == value


def test_inline_form_with_label_mapping_and_series_fields() -> None:
    metadata = load_metadata(
        {
            "algorithm_name": "nnU-Net organ",
            "segment_names": {"1": "prostate", 3: "lesion"},
            "series_description": "nnU-Net organ segmentation",
            "body_part_examined": "pelvis",
            "series_number": 401,
        }
    )
    assert metadata.label_ids == [1, 3]
    assert metadata.series_description == "nnU-Net organ segmentation"
    assert metadata.body_part_examined == "PELVIS"
    assert metadata.series_number == "401"
    assert metadata.segments[1].property_type.meaning == codes.SCT.Lesion.meaning
    assert validate_metadata(metadata.to_dcmqi()) == []


def test_unknown_inline_name_is_a_spec_error_with_close_matches() -> None:
    with pytest.raises(SpecError) as raised:
        SegmentationMetadata.from_inline(
            {"algorithm_name": "organ", "segment_names": ["prostat", "bladder", "bladdr"]}
        )
    message = str(raised.value)
    assert "segment_names[1]: 'prostat'" in message
    assert "Prostate" in message
    assert "segment_names[3]: 'bladdr'" in message
    assert "close matches: Bladder" in message
    assert "segment_names[2]" not in message


def test_inline_form_rejects_unknown_and_missing_keys() -> None:
    assert validate_metadata({"segment_names": ["prostate"], "colour": "red"}) == [
        "algorithm_name: missing",
        "colour: unknown key",
    ]


def test_validate_metadata_names_the_path_of_each_bad_key() -> None:
    problems = validate_metadata(bad_template())
    assert "SeriesNumber: Input should be a valid string (got 300)" in problems
    assert any(p.startswith("BodyPartExamined: String should match pattern") for p in problems)
    assert (
        "segmentAttributes[0][1].SegmentedPropertyTypeCodeSequence.CodeValue: missing" in problems
    )
    assert any(
        p.startswith("segmentAttributes[0][0].SegmentAlgorithmType: Input should be 'AUTOMATIC'")
        for p in problems
    )
    assert any(
        p.startswith("segmentAttributes[0][2].recommendedDisplayRGBValue[2]: Input should be less")
        for p in problems
    )
    assert "segmentAttributes[0][2].Colour: unknown key" in problems
    assert len(problems) == 6


def test_validate_metadata_finds_repeated_label_ids_and_empty_lists() -> None:
    template = dcmqi_template()
    template["segmentAttributes"][1][0]["labelID"] = 2
    assert validate_metadata(template) == [
        "segmentAttributes[1][0].labelID: 2 repeats segmentAttributes[0][1].labelID"
    ]
    assert validate_metadata({"segmentAttributes": [[]]}) == [
        "segmentAttributes[0]: List should have at least 1 item after validation, not 0 (got [])"
    ]
    assert validate_metadata({}) == ["segmentAttributes: missing"]


def test_bad_template_file_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "template.json"
    path.write_text(json.dumps(bad_template()))
    with pytest.raises(SpecError, match=r"template\.json: .*CodeValue: missing"):
        load_dcmqi_template(path)
    path.write_text("{not json")
    (problem,) = validate_metadata(path)
    assert problem.startswith("cannot read a JSON template")
