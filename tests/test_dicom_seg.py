"""DICOM SEG writers: validity (dciodvfy), read-back through highdicom and dcmqi, atomicity."""

import json
import math
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import dciodvfy_errors, dcmqi_labels, highdicom_labels
from dicom_image_writer import SeriesIdentity, write_image_series
from pydicom.uid import RLELossless

from nnunet_bento.errors import RequestError
from nnunet_bento.io.dicom_seg import (
    bin_probabilities,
    write_binned_segmentation,
    write_fractional_segmentation,
    write_label_segmentation,
)
from nnunet_bento.io.dicom_source import AlgorithmIdentity, DicomSource
from nnunet_bento.io.seg_metadata import SegmentationMetadata
from nnunet_bento.io.staging import OutputStaging

TOOLS = Path(sys.executable).parent
IDENTITY = AlgorithmIdentity(
    name="nnU-Net organ", version="0.1.0", model_tag="organ:k3xq2", checkpoint_sha256="cd" * 32
)
SHAPE = (7, 24, 20)  # z, y, x: rows != columns catches swapped axes
LABEL_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# Labels of this template's segments, keyed by SegmentLabel: how read-backs find our labels.
LABEL_OF = {"prostate": 1, "bladder": 2, "rectum": 3, "lesion": 5}


def organ_metadata() -> SegmentationMetadata:
    return SegmentationMetadata.from_inline(
        {
            "algorithm_name": "nnU-Net organ",
            "segment_names": {label: name for name, label in LABEL_OF.items()},
            "series_description": "nnU-Net organ segmentation",
            "body_part_examined": "PELVIS",
        }
    )


BIN_NAMES = ["<10%", *(f"{10 * k}-{10 * k + 10}%" for k in range(1, 9)), ">90%"]


def bins_metadata() -> SegmentationMetadata:
    """A fractional template whose labels name the 10 bins: '<10%', '10-20%', ..., '>90%'."""
    segment = {
        "SegmentAlgorithmType": "AUTOMATIC",
        "SegmentedPropertyCategoryCodeSequence": {
            "CodeValue": "49755003",
            "CodingSchemeDesignator": "SCT",
            "CodeMeaning": "Morphologically Altered Structure",
        },
        "SegmentedPropertyTypeCodeSequence": {
            "CodeValue": "52988006",
            "CodingSchemeDesignator": "SCT",
            "CodeMeaning": "Lesion",
        },
    }
    return SegmentationMetadata.from_dcmqi(
        {
            "SeriesDescription": "Lesion probability bins",
            "segmentAttributes": [
                [
                    {**segment, "labelID": k, "SegmentLabel": name}
                    for k, name in enumerate(BIN_NAMES, start=1)
                ]
            ],
        }
    )


def source_image(oblique: bool) -> sitk.Image:
    """A CT-like volume with anisotropic spacing; the oblique one is rotated about two axes."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-200, 200, SHAPE).astype(np.int16))
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((-12.5, 30.0, 104.0))
    if oblique:
        a, b = math.radians(25), math.radians(15)
        about_x = np.array(
            [[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]]
        )
        about_z = np.array(
            [[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]]
        )
        image.SetDirection((about_z @ about_x).ravel().tolist())
    return image


def make_source(folder: Path, image: sitk.Image) -> DicomSource:
    """Write ``image`` as a series (files in shuffled order) and read it as a DicomSource."""
    order = [3, 0, 6, 1, 5, 2, 4]
    paths = write_image_series(image, folder, SeriesIdentity(series_number=7), file_order=order)
    datasets = [pydicom.dcmread(path) for path in paths]
    orientation = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, float)))
    return DicomSource(image=image, datasets=datasets, folder=folder)


@pytest.fixture(scope="module", params=[False, True], ids=["axial", "oblique"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DicomSource:
    return make_source(tmp_path_factory.mktemp("series"), source_image(request.param))


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> DicomSource:
    return make_source(tmp_path_factory.mktemp("axial"), source_image(False))


def corner_mask() -> np.ndarray:
    """Label 1 in the first-slice, first-row, first-column corner; 2 and 5 elsewhere; no 3."""
    mask = np.zeros(SHAPE, np.uint8)
    mask[0:3, 0:6, 0:4] = 1
    mask[3:6, 14:22, 10:18] = 2
    mask[5, 2:5, 15:19] = 5
    return mask


def test_dciodvfy_catches_a_broken_seg(axial: DicomSource, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    write_label_segmentation(corner_mask(), axial, organ_metadata(), IDENTITY, path)
    seg = pydicom.dcmread(path)
    del seg.SegmentSequence[0].SegmentLabel
    seg.save_as(path)
    assert any("SegmentLabel" in error for error in dciodvfy_errors(path))


@pytest.mark.parametrize(
    ("segmentation_type", "compress"),
    [("binary", False), ("labelmap", False), ("labelmap", True)],
)
def test_label_seg_is_valid_and_reads_back_voxel_for_voxel(
    source: DicomSource, segmentation_type: str, compress: bool, tmp_path: Path
) -> None:
    mask = corner_mask()
    path = tmp_path / "seg.dcm"
    written = write_label_segmentation(
        mask,
        source,
        organ_metadata(),
        IDENTITY,
        path,
        segmentation_type=segmentation_type,
        compress=compress,
    )
    assert written
    assert dciodvfy_errors(path) == []
    from_highdicom = highdicom_labels(path, source, LABEL_OF)
    np.testing.assert_array_equal(from_highdicom, mask)
    from_dcmqi = dcmqi_labels(path, source, tmp_path / "dcmqi", LABEL_OF)
    np.testing.assert_array_equal(from_dcmqi, mask)
    assert (from_dcmqi[0:3, 0:6, 0:4] == 1).all()
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == segmentation_type.upper()
    assert (seg.SOPClassUID == LABEL_SEG_STORAGE) == (segmentation_type == "labelmap")
    assert (seg.file_meta.TransferSyntaxUID == RLELossless) == compress


def test_label_seg_references_the_source_and_names_the_model(
    axial: DicomSource, tmp_path: Path
) -> None:
    path = tmp_path / "seg.dcm"
    write_label_segmentation(corner_mask(), axial, organ_metadata(), IDENTITY, path)
    seg = pydicom.dcmread(path)
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == axial.series_instance_uid
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in axial.datasets
    }
    assert seg.StudyInstanceUID == axial.datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == axial.datasets[0].FrameOfReferenceUID
    assert seg.SeriesDescription == "nnU-Net organ segmentation"
    assert seg.BodyPartExamined == "PELVIS"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["prostate", "bladder", "lesion"]
    for item in seg.SegmentSequence:
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("nnU-Net organ", "0.1.0")
        assert "model_tag=organ:k3xq2" in algorithm.AlgorithmParameters
        assert f"checkpoint_sha256={'cd' * 32}" in algorithm.AlgorithmParameters


def test_series_description_argument_wins(axial: DicomSource, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    write_label_segmentation(
        corner_mask(), axial, organ_metadata(), IDENTITY, path, series_description="Organs v2"
    )
    assert pydicom.dcmread(path).SeriesDescription == "Organs v2"


def test_empty_mask_writes_nothing_without_an_empty_template(
    axial: DicomSource, tmp_path: Path
) -> None:
    path = tmp_path / "seg.dcm"
    empty = np.zeros(SHAPE, np.uint8)
    assert not write_label_segmentation(empty, axial, organ_metadata(), IDENTITY, path)
    assert list(tmp_path.iterdir()) == []


def test_empty_mask_writes_the_empty_template(axial: DicomSource, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    empty_metadata = SegmentationMetadata.from_inline(
        {"algorithm_name": "nnU-Net lesion", "segment_names": ["lesion"]}
    )
    empty = np.zeros(SHAPE, np.uint8)
    assert write_label_segmentation(
        empty, axial, organ_metadata(), IDENTITY, path, empty_metadata=empty_metadata
    )
    assert dciodvfy_errors(path) == []
    np.testing.assert_array_equal(highdicom_labels(path, axial, LABEL_OF), empty)
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "BINARY"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["lesion"]
    (series,) = seg.ReferencedSeriesSequence
    assert len(series.ReferencedInstanceSequence) == len(axial.datasets)


@pytest.mark.parametrize("compress", [False, True])
def test_fractional_seg_matches_probabilities_within_quantisation(
    source: DicomSource, compress: bool, tmp_path: Path
) -> None:
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in SHAPE), indexing="ij")
    probabilities = np.stack([x * y, np.clip(1.2 - z - x, 0, 1)]).astype(np.float32)
    probabilities[0, :, :, :3] = 0
    path = tmp_path / "seg.dcm"
    assert write_fractional_segmentation(
        probabilities, [2, 5], source, organ_metadata(), IDENTITY, path, compress=compress
    )
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["bladder", "lesion"]
    read = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source.datasets], rescale_fractional=True, dtype=np.float64
    )
    np.testing.assert_allclose(np.moveaxis(read, -1, 0), probabilities, atol=0.5 / 255 + 1e-6)
    assert (seg.file_meta.TransferSyntaxUID == RLELossless) == compress


def test_all_zero_probabilities_write_nothing(axial: DicomSource, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    zeros = np.zeros((1, *SHAPE), np.float32)
    assert not write_fractional_segmentation(zeros, [5], axial, organ_metadata(), IDENTITY, path)
    assert not write_binned_segmentation(zeros[0], axial, bins_metadata(), IDENTITY, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bin_probabilities_edges(dtype: type) -> None:
    probability = np.array([0, 0.05, 0.1, 0.5, 0.95, 1.0, 0.0999, 1e-9], dtype)
    np.testing.assert_array_equal(bin_probabilities(probability, 10), [0, 1, 2, 6, 10, 10, 1, 1])


def test_bin_probabilities_rejects_values_outside_0_1() -> None:
    with pytest.raises(ValueError, match="probability: values must lie in"):
        bin_probabilities(np.array([0.5, 1.5]), 10)
    with pytest.raises(ValueError, match="n: 0 bins"):
        bin_probabilities(np.array([0.5]), 0)


def test_binned_seg_puts_each_probability_in_its_bin(source: DicomSource, tmp_path: Path) -> None:
    probability = np.zeros(SHAPE)
    for z, value in enumerate([0, 0.05, 0.1, 0.5, 0.95, 1.0]):
        probability[z, :4, :5] = value
    expected = np.zeros(SHAPE, np.uint8)
    for z, segment in enumerate([0, 1, 2, 6, 10, 10]):
        expected[z, :4, :5] = segment
    path = tmp_path / "seg.dcm"
    assert write_binned_segmentation(probability, source, bins_metadata(), IDENTITY, path)
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == BIN_NAMES
    bin_of = {name: k for k, name in enumerate(BIN_NAMES, start=1)}
    np.testing.assert_array_equal(highdicom_labels(path, source, bin_of), expected)
    np.testing.assert_array_equal(dcmqi_labels(path, source, tmp_path / "dcmqi", bin_of), expected)


def test_failed_write_leaves_no_file(
    axial: DicomSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_half_way(self: hd.seg.Segmentation, filename: Path, **kwargs: object) -> None:
        Path(filename).write_bytes(b"DICM" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", fail_half_way)
    with (
        pytest.raises(OSError, match="disk full"),
        OutputStaging(tmp_path / "out", tmp_path / "work", overwrite=False) as staging,
    ):
        path = staging.path("stage_0/prediction.dcm")
        write_label_segmentation(corner_mask(), axial, organ_metadata(), IDENTITY, path)
    assert not (tmp_path / "out").exists()


def test_writer_errors_name_the_argument(axial: DicomSource, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    mask, metadata = corner_mask(), organ_metadata()
    with pytest.raises(ValueError, match=r"mask: shape \(7, 20, 24\)"):
        write_label_segmentation(mask.transpose(0, 2, 1), axial, metadata, IDENTITY, path)
    with pytest.raises(RequestError, match="compress"):
        write_label_segmentation(mask, axial, metadata, IDENTITY, path, compress=True)
    with pytest.raises(ValueError, match="segmentation_type: FRACTIONAL takes probabilities"):
        write_label_segmentation(
            mask, axial, metadata, IDENTITY, path, segmentation_type="fractional"
        )
    mask[0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"labels: .*\[4\]"):
        write_label_segmentation(mask, axial, metadata, IDENTITY, path)
    with pytest.raises(ValueError, match="probabilities: shape"):
        write_fractional_segmentation(
            np.zeros(SHAPE, np.float32), [1], axial, metadata, IDENTITY, path
        )
    assert list(tmp_path.iterdir()) == []


def test_dcmqi_accepts_our_templates(axial: DicomSource, tmp_path: Path) -> None:
    """to_dcmqi() of an inline form is a template dcmqi's itkimage2segimage writes from."""
    mask_image = sitk.GetImageFromArray(corner_mask())
    mask_image.CopyInformation(axial.image)
    sitk.WriteImage(mask_image, tmp_path / "mask.nrrd")
    template = tmp_path / "template.json"
    template.write_text(json.dumps(organ_metadata().to_dcmqi()))
    result = subprocess.run(
        [
            TOOLS / "itkimage2segimage",
            "--inputImageList", tmp_path / "mask.nrrd",
            "--inputDICOMDirectory", axial.folder,
            "--inputMetadata", template,
            "--outputDICOM", tmp_path / "dcmqi.dcm",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    labels = sorted(
        item.SegmentLabel for item in pydicom.dcmread(tmp_path / "dcmqi.dcm").SegmentSequence
    )
    assert labels == ["bladder", "lesion", "prostate"]
