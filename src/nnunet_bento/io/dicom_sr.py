"""Write per-label measurements as a DICOM SR that references the label SEG, with highdicom.

A Comprehensive 3D SR (PS3.3 A.35.13) holds a Measurement Report (PS3.16 TID 1500) with
one Volumetric ROI Measurements group (TID 1411) per non-empty segment of the SEG that
``write_label_segmentation`` wrote:

- Referenced Segment: the SEG instance and the segment's number, and the source series
  (Source series for segmentation: one item, where Source images for segmentation would list
  every slice in every group; dcmqi reads it as SourceSeriesForImageSegmentation);
- Tracking Identifier and UID: the segment's Tracking ID and UID, else its label and a new UID;
- Finding: the segment's Segmented Property Type; Finding Site: its Anatomic Region, with
  its modifier as laterality (CID 244) or topographical modifier;
- Volume (SCT 118565006) in ml: the only item in ml;
- on CT, Attenuation Coefficient (DCM 112031) in Hounsfield units (UCUM [hnsf'U]), once per
  statistic with its Derivation (CID 7464: Mean, Standard Deviation, Median, Minimum,
  Maximum); on MR the same statistics as MR signal intensity (DCM 110852) with no units
  (UCUM 1); other modalities, whose pixel values have no quantity here, get no intensity item;
- with a mean probability, Fractional Probabilistic Segmentation (DCM 110854) with the
  Derivation Mean and no units (UCUM 1).

Every measurement names the algorithm (TID 4019) as the SEG's Segmentation Algorithm
Identification does, and the observer context names the model as the device observer
(TID 1004). The SR has the patient and study of the source series and lists the series and
the SEG as evidence. It also carries the series' Frame of Reference UID, which the IOD asks
for only with SCOORD3D content (there is none): dciodvfy warns that this makes the instance
Standard Extended.

An empty result writes no SR, as ``write_label_segmentation`` writes no SEG for it unless
given an empty template: nothing is measured, so nothing references it.
"""

from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from ..measure import IntensityStatistics, LabelMeasurement
from .dicom_seg import MANUFACTURER
from .dicom_source import AlgorithmIdentity, DicomSource
from .seg_metadata import algorithm_identification

LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
MILLILITER = Code("ml", "UCUM", "milliliter")
#: The quantity (CID 7469) and unit (CID 7181) of the pixel values of each modality.
INTENSITY_QUANTITIES: dict[str, tuple[Code, Code]] = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits),
}
#: The Derivation (CID 7464) of each field of IntensityStatistics.
DERIVATIONS: dict[str, Code] = {
    "mean": codes.SCT.Mean,
    "std": codes.SCT.StandardDeviation,
    "median": codes.SCT.Median,
    "min": codes.SCT.Minimum,
    "max": codes.SCT.Maximum,
}
LATERALITIES = frozenset(code.value for code in codes.cid244.concepts.values())


def write_measurement_report(
    measurements: dict[str, LabelMeasurement],
    seg_path: Path,
    source: DicomSource,
    identity: AlgorithmIdentity,
    path: Path,
    *,
    series_description: str | None = None,
) -> bool:
    """Write ``measurements`` of the mask whose label SEG is ``seg_path`` as an SR at ``path``.

    The SEG numbers its segments 1..n for the non-empty labels in ascending order, so the
    k-th non-empty label is segment k; a SEG with another count of segments is refused.
    Returns False, and writes nothing, when no label is non-empty.
    """
    found = sorted((m for m in measurements.values() if m.voxels), key=lambda m: m.label)
    if not found:
        return False
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    segments = _segments(seg, source, len(found))
    quantity = INTENSITY_QUANTITIES.get(str(source.datasets[0].get("Modality", "")))
    algorithm = _algorithm(identity)
    groups = [
        _group(measurement, seg, segment, source.series_instance_uid, quantity, algorithm)
        for measurement, segment in zip(found, segments, strict=True)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(identity),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source.datasets, seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=int(seg.SeriesNumber) + 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=series_description or f"{identity.name} measurements"[:64],
        manufacturer_model_name=identity.name[:64],
        software_versions=identity.version,
        device_serial_number=identity.model_tag[:64],
    )
    first = source.datasets[0]
    sr.FrameOfReferenceUID = first.FrameOfReferenceUID
    sr.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    sr.save_as(path, enforce_file_format=True)
    return True


def _segments(seg: pydicom.Dataset, source: DicomSource, count: int) -> list[pydicom.Dataset]:
    """Segments 1..n of a label SEG of the source series, checked to number ``count``.

    A LABELMAP SEG also describes segment 0, the background, which is left out.
    """
    if seg.SOPClassUID not in (SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE):
        raise ValueError(f"seg_path: SOPClassUID {seg.SOPClassUID} is not a segmentation")
    if seg.SegmentationType == "FRACTIONAL":
        raise ValueError("seg_path: SegmentationType FRACTIONAL is not a label SEG")
    first = source.datasets[0]
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if seg.get(keyword) != first.get(keyword):
            raise ValueError(
                f"seg_path: {keyword} {seg.get(keyword)} is not the source's {first.get(keyword)}"
            )
    series = [item.SeriesInstanceUID for item in seg.get("ReferencedSeriesSequence", [])]
    if series != [source.series_instance_uid]:
        raise ValueError(
            f"seg_path: ReferencedSeriesSequence {series} is not the source series "
            f"{source.series_instance_uid}"
        )
    segments = sorted(
        (item for item in seg.SegmentSequence if int(item.SegmentNumber) > 0),
        key=lambda item: int(item.SegmentNumber),
    )
    if [int(item.SegmentNumber) for item in segments] != list(range(1, count + 1)):
        raise ValueError(
            f"seg_path: SegmentSequence has segments {[int(i.SegmentNumber) for i in segments]} "
            f"for {count} non-empty labels; give the label SEG of the measured mask"
        )
    return segments


def _algorithm(identity: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the name, family, version and parameters of the SEG's algorithm."""
    sequence = algorithm_identification(identity)
    return hd.sr.AlgorithmIdentification(
        name=sequence.name,
        version=sequence.version,
        parameters=[f"{key}={value}" for key, value in (sequence.parameters or {}).items()],
        family=sequence.family,
    )


def _observation_context(identity: AlgorithmIdentity) -> hd.sr.ObservationContext:
    """The model as the device observer, with a UID that is the same for the same model."""
    uid = pydicom.uid.generate_uid(
        entropy_srcs=[identity.name, identity.version, identity.checkpoint_sha256]
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid,
        name=identity.name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=identity.name[:64],
        serial_number=identity.model_tag[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _concept(item: pydicom.Dataset) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)


def _finding_sites(segment: pydicom.Dataset) -> list[hd.sr.FindingSite] | None:
    """The segment's Anatomic Region, its modifier as laterality or topographical modifier."""
    if "AnatomicRegionSequence" not in segment:
        return None
    region = segment.AnatomicRegionSequence[0]
    modifier = None
    if "AnatomicRegionModifierSequence" in region:
        modifier = _concept(region.AnatomicRegionModifierSequence[0])
    lateral = modifier is not None and modifier.value in LATERALITIES
    return [
        hd.sr.FindingSite(
            anatomic_location=_concept(region),
            laterality=modifier if lateral else None,
            topographical_modifier=None if lateral else modifier,
        )
    ]


def _group(
    measurement: LabelMeasurement,
    seg: pydicom.Dataset,
    segment: pydicom.Dataset,
    source_series: str,
    quantity: tuple[Code, Code] | None,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for one segment: its reference, codes, volume, intensity and probability."""
    items = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=measurement.volume_ml,
            unit=MILLILITER,
            algorithm_id=algorithm,
        )
    ]
    if quantity is not None and measurement.intensity is not None:
        items += _intensity_measurements(measurement.intensity, *quantity, algorithm)
    if measurement.mean_probability is not None:
        items.append(
            hd.sr.Measurement(
                name=codes.DCM.FractionalProbabilisticSegmentation,
                value=measurement.mean_probability,
                unit=codes.UCUM.NoUnits,
                derivation=codes.SCT.Mean,
                algorithm_id=algorithm,
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=segment.get("TrackingUID") or hd.UID(),
            identifier=segment.get("TrackingID") or segment.SegmentLabel,
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=int(segment.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(source_series),
        ),
        finding_type=_concept(segment.SegmentedPropertyTypeCodeSequence[0]),
        finding_sites=_finding_sites(segment),
        measurements=items,
    )


def _intensity_measurements(
    statistics: IntensityStatistics,
    name: Code,
    unit: Code,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[hd.sr.Measurement]:
    """One measurement of the pixel-value quantity per statistic, with its derivation."""
    return [
        hd.sr.Measurement(
            name=name,
            value=getattr(statistics, field),
            unit=unit,
            derivation=derivation,
            algorithm_id=algorithm,
        )
        for field, derivation in DERIVATIONS.items()
    ]
