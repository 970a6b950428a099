"""DICOM SR (TID 1500) of the measurements: validity, and read-back by dcmqi and highdicom."""

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import dciodvfy_errors
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage
from sr_checks import dcmqi_items, dcmqi_report

from nnunet_bento.io.dicom_seg import write_label_segmentation
from nnunet_bento.io.dicom_series import read_dicom_series
from nnunet_bento.io.dicom_source import AlgorithmIdentity, DicomSource
from nnunet_bento.io.dicom_sr import write_measurement_report
from nnunet_bento.io.seg_metadata import SegmentationMetadata, load_dcmqi_template
from nnunet_bento.measure import LabelMeasurement, intensity_unit, measure_labels

REPO = Path(__file__).resolve().parents[1]
DICOM = REPO / "examples" / "dicom"
IDENTITY = AlgorithmIdentity(
    name="nnU-Net organ", version="0.1.0", model_tag="organ:k3xq2", checkpoint_sha256="cd" * 32
)
VOLUME, ATTENUATION, MR_SIGNAL, PROBABILITY = "118565006", "112031", "110852", "110854"
STATISTICS = {"Mean": "mean", "Standard Deviation": "std", "Median": "median"}
STATISTICS |= {"Minimum": "min", "Maximum": "max"}
# dciodvfy's condition on Referenced Segment Number knows the Segmentation and Surface
# Segmentation Storage classes, not Label Map Segmentation Storage (a Segmentation IOD too).
LABELMAP_REFERENCE_ERROR = (
    "Error - Shall not be present for Referenced SOP Class that is not segmentation - "
    "attribute <ReferencedSegmentNumber>"
)


@dataclass(frozen=True)
class Written:
    """A label SEG and the SR of its measurements, written from one mask."""

    kind: str
    source: DicomSource
    seg_path: Path
    sr_path: Path
    measurements: dict[str, LabelMeasurement]

    @property
    def seg(self) -> pydicom.Dataset:
        return pydicom.dcmread(self.seg_path, stop_before_pixels=True)

    def segment(self, number: int) -> pydicom.Dataset:
        """The SEG's Segment Sequence item of a segment number."""
        return next(item for item in self.seg.SegmentSequence if item.SegmentNumber == number)

    def found(self) -> list[LabelMeasurement]:
        """The non-empty labels, in label order: segments 1..n."""
        return sorted((m for m in self.measurements.values() if m.voxels), key=lambda m: m.label)


def blobs(shape: tuple[int, ...], labels: dict[int, tuple[float, float, float]]) -> np.ndarray:
    """Label ``k`` in an ellipsoid of radii (6, 9, 7) voxels around the (z, y, x) centre."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mask = np.zeros(shape, np.uint8)
    for label, (cz, cy, cx) in labels.items():
        mask[((z - cz) / 6) ** 2 + ((y - cy) / 9) ** 2 + ((x - cx) / 7) ** 2 < 1] = label
    return mask


def write_report(
    source: DicomSource,
    mask: np.ndarray,
    metadata: SegmentationMetadata,
    folder: Path,
    kind: str = "binary",
    probabilities: np.ndarray | None = None,
    probability_labels: tuple[int, ...] = (),
) -> Written:
    """Write the SEG of ``mask``, measure it on the source's values and write the SR."""
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    assert write_label_segmentation(
        mask, source, metadata, IDENTITY, seg_path, segmentation_type=kind
    )
    measurements = measure_labels(
        mask,
        source.image,
        {segment.label_id: segment.label for segment in metadata.segments},
        intensity=sitk.GetArrayFromImage(source.image),
        unit=intensity_unit(source.datasets[0].Modality),
        probabilities=probabilities,
        probability_labels=probability_labels,
    )
    assert write_measurement_report(measurements, seg_path, source, IDENTITY, sr_path)
    return Written(kind, source, seg_path, sr_path, measurements)


@pytest.fixture(scope="module")
def ct() -> DicomSource:
    return read_dicom_series(DICOM / "ct" / "CT")


@pytest.fixture(scope="module", params=["binary", "labelmap"])
def report(
    request: pytest.FixtureRequest, ct: DicomSource, tmp_path_factory: pytest.TempPathFactory
) -> Written:
    mask = blobs((24, 48, 48), {1: (8, 20, 18), 2: (16, 30, 30)})
    metadata = load_dcmqi_template(REPO / "examples" / "metadata" / "organ.json")
    return write_report(ct, mask, metadata, tmp_path_factory.mktemp("sr"), request.param)


def test_sr_passes_dciodvfy(report: Written) -> None:
    errors = dciodvfy_errors(report.sr_path)
    if report.kind == "labelmap":
        errors = [error for error in errors if error != LABELMAP_REFERENCE_ERROR]
    assert errors == []
    assert pydicom.dcmread(report.sr_path).SOPClassUID == Comprehensive3DSRStorage


def test_dcmqi_reads_volumes_and_segment_references(report: Written, tmp_path: Path) -> None:
    dcmqi = dcmqi_report(report.sr_path, tmp_path / "sr.json")
    seg = report.seg
    groups = dcmqi["Measurements"]
    assert [group["ReferencedSegment"] for group in groups] == [1, 2]
    for group, measurement in zip(groups, report.found(), strict=True):
        segment = report.segment(group["ReferencedSegment"])
        assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        assert group["SourceSeriesForImageSegmentation"] == report.source.series_instance_uid
        assert (
            group["Finding"]["CodeValue"] == segment.SegmentedPropertyTypeCodeSequence[0].CodeValue
        )
        assert group["TrackingIdentifier"] == segment.SegmentLabel
        (volume,) = dcmqi_items(group, VOLUME).values()
        assert volume["units"]["CodeValue"] == "ml"
        assert float(volume["value"]) == pytest.approx(measurement.volume_ml, abs=0.001)
        assert [
            item for item in group["measurementItems"] if item["units"]["CodeValue"] == "ml"
        ] == [volume]
        intensity = dcmqi_items(group, ATTENUATION)
        assert set(intensity) == set(STATISTICS)
        for meaning, field in STATISTICS.items():
            assert intensity[meaning]["units"]["CodeValue"] == "[hnsf'U]"
            expected = getattr(measurement.intensity, field)
            assert float(intensity[meaning]["value"]) == pytest.approx(expected, abs=0.001)
    assert {group["Finding"]["CodeMeaning"] for group in groups} == {"Prostate", "Bladder"}


def test_highdicom_reads_back_the_same(report: Written) -> None:
    sr = hd.sr.srread(report.sr_path)
    seg = report.seg
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for number, (group, measurement) in enumerate(zip(groups, report.found(), strict=True), 1):
        segment = report.segment(number)
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_sop_class_uid == seg.SOPClassUID
        assert reference.referenced_segment_numbers == [number]
        assert group.finding_type == hd.sr.CodedConcept.from_dataset(
            segment.SegmentedPropertyTypeCodeSequence[0]
        )
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit == hd.sr.CodedConcept("ml", "UCUM", "milliliter")
        assert volume.value == pytest.approx(measurement.volume_ml, abs=0.001)
        means = [
            m
            for m in group.get_measurements(name=codes.DCM.AttenuationCoefficient)
            if m.derivation == codes.SCT.Mean
        ]
        assert len(means) == 1 and means[0].unit == codes.UCUM.HounsfieldUnit
        assert means[0].value == pytest.approx(measurement.intensity.mean, abs=0.001)


def test_patient_study_and_frame_of_reference_are_the_sources(report: Written) -> None:
    sr = pydicom.dcmread(report.sr_path)
    first = report.source.datasets[0]
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert sr[keyword].value == first[keyword].value, keyword
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID not in (first.SeriesInstanceUID, report.seg.SeriesInstanceUID)
    evidence = hd.sr.srread(report.sr_path).get_evidence(current_procedure_only=True)
    assert {(study, series, instance) for study, series, instance, _ in evidence} == {
        (first.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for ds in [*report.source.datasets, report.seg]
    }


def test_algorithm_is_named_as_in_the_seg(report: Written, tmp_path: Path) -> None:
    (algorithm,) = report.seg.SegmentSequence[-1].SegmentationAlgorithmIdentificationSequence
    dcmqi = dcmqi_report(report.sr_path, tmp_path / "sr.json")
    for group in dcmqi["Measurements"]:
        for item in group["measurementItems"]:
            named = item["measurementAlgorithmIdentification"]
            assert named["AlgorithmName"] == algorithm.AlgorithmName
            assert named["AlgorithmVersion"] == algorithm.AlgorithmVersion
            assert ",".join(named["AlgorithmParameters"]) == algorithm.AlgorithmParameters
    assert f"checkpoint_sha256={'cd' * 32}" in algorithm.AlgorithmParameters
    observer = dcmqi["observerContext"]
    assert observer["ObserverType"] == "DEVICE"
    assert observer["DeviceObserverName"] == IDENTITY.name
    assert observer["DeviceObserverSerialNumber"] == IDENTITY.model_tag


def test_segment_numbers_follow_the_labels_present(ct: DicomSource, tmp_path: Path) -> None:
    """Labels 2 and 5 present of 1, 2, 3, 5: segment 1 is label 2, segment 2 is label 5."""
    metadata = SegmentationMetadata.from_inline(
        {
            "algorithm_name": "nnU-Net organ",
            "segment_names": {1: "prostate", 2: "bladder", 3: "rectum", 5: "lesion"},
        }
    )
    mask = blobs((24, 48, 48), {2: (8, 20, 18), 5: (16, 30, 32)})
    mask[15:18, 28:33, 39:45] = 5  # the lesion larger than the bladder
    written = write_report(ct, mask, metadata, tmp_path)
    dcmqi = dcmqi_report(written.sr_path, tmp_path / "sr.json")
    by_segment = {group["ReferencedSegment"]: group for group in dcmqi["Measurements"]}
    assert set(by_segment) == {1, 2}
    assert by_segment[1]["Finding"]["CodeMeaning"] == "Bladder"
    assert by_segment[2]["Finding"]["CodeMeaning"] == "Lesion"
    for number, name in ((1, "bladder"), (2, "lesion")):
        (volume,) = dcmqi_items(by_segment[number], VOLUME).values()
        assert float(volume["value"]) == pytest.approx(
            written.measurements[name].volume_ml, abs=1e-3
        )
    assert written.measurements["bladder"].volume_ml != written.measurements["lesion"].volume_ml


def test_finding_site_from_the_anatomic_region(ct: DicomSource, tmp_path: Path) -> None:
    kidney = {"CodeValue": "64033007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Kidney"}
    left = {"CodeValue": "7771000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Left"}
    metadata = SegmentationMetadata.from_dcmqi(
        {
            "segmentAttributes": [
                [
                    {
                        "labelID": 1,
                        "SegmentLabel": "left kidney lesion",
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
                        "AnatomicRegionSequence": kidney,
                        "AnatomicRegionModifierSequence": left,
                        "TrackingIdentifier": "lesion 1",
                        "TrackingUniqueIdentifier": "1.2.3.4.5",
                    }
                ]
            ]
        }
    )
    written = write_report(ct, blobs((24, 48, 48), {1: (12, 24, 24)}), metadata, tmp_path)
    (group,) = dcmqi_report(written.sr_path, tmp_path / "sr.json")["Measurements"]
    assert group["Finding"]["CodeValue"] == "52988006"
    assert (group["FindingSite"], group["Laterality"]) == (kidney, left)
    assert (group["TrackingIdentifier"], group["TrackingUniqueIdentifier"]) == (
        "lesion 1",
        "1.2.3.4.5",
    )
    sr = hd.sr.srread(written.sr_path)
    (site,) = sr.content.get_volumetric_roi_measurement_groups()[0].finding_sites
    assert site.value == hd.sr.CodedConcept("64033007", "SCT", "Kidney")
    assert site.laterality == hd.sr.CodedConcept("7771000", "SCT", "Left")


def test_mr_intensity_is_a_unitless_signal(tmp_path: Path) -> None:
    source = read_dicom_series(DICOM / "mr" / "T2")
    metadata = SegmentationMetadata.from_inline(
        {"algorithm_name": "nnU-Net organ", "segment_names": ["prostate"]}
    )
    written = write_report(source, blobs((24, 48, 48), {1: (12, 24, 24)}), metadata, tmp_path)
    (group,) = dcmqi_report(written.sr_path, tmp_path / "sr.json")["Measurements"]
    assert dcmqi_items(group, ATTENUATION) == {}
    signal = dcmqi_items(group, MR_SIGNAL)
    assert set(signal) == set(STATISTICS)
    assert {item["units"]["CodeValue"] for item in signal.values()} == {"1"}
    mean = written.measurements["prostate"].intensity.mean
    assert float(signal["Mean"]["value"]) == pytest.approx(mean, abs=0.001)
    assert [item["units"]["CodeValue"] for item in group["measurementItems"]].count("ml") == 1
    assert dciodvfy_errors(written.sr_path) == []


def test_mean_probability_is_a_mean_probabilistic_segmentation(
    ct: DicomSource, tmp_path: Path
) -> None:
    mask = blobs((24, 48, 48), {1: (8, 20, 18), 2: (16, 30, 30)})
    probabilities = np.random.default_rng(2).random((1, *mask.shape)).astype(np.float32)
    metadata = load_dcmqi_template(REPO / "examples" / "metadata" / "organ.json")
    written = write_report(
        ct, mask, metadata, tmp_path, probabilities=probabilities, probability_labels=(2,)
    )
    prostate, bladder = dcmqi_report(written.sr_path, tmp_path / "sr.json")["Measurements"]
    assert dcmqi_items(prostate, PROBABILITY) == {}
    (mean,) = dcmqi_items(bladder, PROBABILITY).items()
    assert (mean[0], mean[1]["units"]["CodeValue"]) == ("Mean", "1")
    expected = written.measurements["bladder"].mean_probability
    assert float(mean[1]["value"]) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(probabilities[0][mask == 2].mean())
    assert dciodvfy_errors(written.sr_path) == []


def test_empty_mask_writes_no_sr(ct: DicomSource, tmp_path: Path) -> None:
    empty = np.zeros((24, 48, 48), np.uint8)
    measurements = measure_labels(empty, ct.image, {1: "prostate", 2: "bladder"})
    path = tmp_path / "sr.dcm"
    assert not write_measurement_report(measurements, tmp_path / "no-seg.dcm", ct, IDENTITY, path)
    assert list(tmp_path.iterdir()) == []


def test_a_seg_that_does_not_fit_is_refused(report: Written, tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    mr = read_dicom_series(DICOM / "mr" / "T2")
    with pytest.raises(ValueError, match="seg_path: StudyInstanceUID"):
        write_measurement_report(report.measurements, report.seg_path, mr, IDENTITY, path)
    one_label = {"prostate": report.measurements["prostate"]}
    with pytest.raises(ValueError, match=r"seg_path: SegmentSequence has segments \[1, 2\]"):
        write_measurement_report(one_label, report.seg_path, report.source, IDENTITY, path)
    assert list(tmp_path.iterdir()) == []
