"""The webhooks that a job calls when it ends (its request's ``notify``): the body built from
the job's record, request and response, and its delivery in worker threads.

- A job that ends done or failed calls them (``job.done``, ``job.failed``); a cancelled one,
  whose caller knows, does not.
- The StudyInstanceUID and SeriesInstanceUIDs are those that the listener received for its
  jobs. For a job of the API, they are those that its DICOM outputs reference (the SEG's), or
  the study of its ``dicom_source``; none for a job without DICOM outputs.
- Outputs and pushed files are named relative to NNUNET_BENTO_OUTPUT_ROOT, or, for an output
  folder outside it (an upload's), relative to that folder: as in an upload's result zip.
- A delivery never raises (``deliver``); its result is recorded with the job.
"""

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import pydicom

from ..catalog.registry import Registry
from ..errors import RequestError
from ..job_store import JobRecord
from ..request import DICOM_OUTPUT_FIELDS, OUTPUT_FIELDS, InferenceRequest, InferenceResponse
from ..webhooks import Webhook, deliver, job_payload

UID_TAGS = ["StudyInstanceUID", "ReferencedSeriesSequence"]


def model_versions(registry: Registry, names: Sequence[str]) -> list[tuple[str, str]]:
    """(id, version) of each model a request names: a Bento tag's version, else the model's
    source (its folder under model_folder, or its TotalSegmentator task)."""
    versions = []
    for name in names:
        try:
            model = registry.get(name)
        except RequestError:
            versions.append((name, "unknown"))
            continue
        version = model.source.rpartition(":")[2] if model.entry.tag else model.source
        versions.append((model.id, version))
    return versions


def output_uids(paths: Sequence[str]) -> tuple[str | None, list[str]]:
    """The StudyInstanceUID of DICOM outputs and the series that they reference."""
    study, series = None, []
    for path in paths:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=UID_TAGS)
        study = study or dataset.get("StudyInstanceUID")
        for item in dataset.get("ReferencedSeriesSequence", []):
            if item.SeriesInstanceUID not in series:
                series.append(str(item.SeriesInstanceUID))
    return (None if study is None else str(study)), series


def relative_push(push: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    """Push records with their file named relative to ``base``."""
    return [
        {**record, "file": Path(record["file"]).relative_to(base).as_posix()}
        if "file" in record
        else record
        for record in push
    ]


def job_webhook_body(
    record: JobRecord,
    request: InferenceRequest,
    response: InferenceResponse | None,
    registry: Registry,
    output_root: Path | None,
    subject: tuple[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The webhook body of a job that ended done (with ``response``) or failed; ``subject``
    is the (study, series) UIDs when the job's source knows them. Reads DICOM outputs, so
    call it in a worker thread."""
    output_dir = Path(request.output_dir).resolve()
    inside = output_root is not None and output_dir.is_relative_to(output_root)
    base = output_root if inside and output_root is not None else output_dir
    outputs: list[str] = []
    dicom: list[str] = []
    push: list[dict[str, Any]] = []
    if response is not None:
        outputs = [path for field in OUTPUT_FIELDS for path in getattr(response, field)]
        dicom = [path for field in DICOM_OUTPUT_FIELDS for path in getattr(response, field)]
        push = relative_push(response.push, base)
    if subject is None:
        study, series = output_uids(dicom)
        if study is None and request.dicom_source is not None:
            study = request.dicom_source.study_uid
        subject = (study, series)
    return job_payload(
        event="job.done" if record.status == "done" else "job.failed",
        job_id=record.job_id,
        study_instance_uid=subject[0],
        series_instance_uids=subject[1],
        models=model_versions(registry, request.model_ids),
        outputs=[Path(path) for path in outputs],
        output_root=base,
        push=push,
        error=record.error,
    )


async def deliver_all(webhooks: Sequence[Webhook], body: dict[str, Any]) -> list[dict[str, Any]]:
    """Deliver ``body`` to each webhook at once, each in a worker thread; their results."""
    results: list[dict[str, Any]] = [{} for _ in webhooks]

    async def one(index: int, webhook: Webhook) -> None:
        results[index] = asdict(await anyio.to_thread.run_sync(deliver, webhook, body))

    async with anyio.create_task_group() as group:
        for index, webhook in enumerate(webhooks):
            group.start_soon(one, index, webhook)
    return results
