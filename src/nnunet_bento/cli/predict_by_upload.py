"""`nnunet-bento predict --url URL`: the same flags (but --dicom_source), run on a server by
upload.

The series (and the --intersect_with mask) are packed, run as an upload job, and the outputs
come back under the command's own names, replacing the previous outputs in -o as a whole.
"""

import argparse
import tempfile
from pathlib import Path
from typing import Any

from ..client import Client
from ..errors import RequestError
from ..io.staging import OutputStaging
from ..plan import CLI_LAYOUT
from ..request import OUTPUT_KINDS, SERVER_SET_FIELDS, InferenceRequest, StageOutputs, stage_files
from ..settings import load_settings


def upload_fields(request: InferenceRequest) -> dict:
    """The upload's request part: what the flags gave, without what the server sets."""
    if request.dicom_source is not None:
        raise RequestError(
            "--dicom_source pulls on the machine that runs the request: run it without --url, "
            "or pull the series yourself and give their folders"
        )
    return request.model_dump(mode="json", exclude_none=True, exclude=set(SERVER_SET_FIELDS))


def study_members(request: InferenceRequest) -> list[str]:
    """The study's files to upload: the series and the mask the request names."""
    members = list(request.series_folders or [])
    return [*members, request.intersect_with] if request.intersect_with else members


def rename_outputs(stage: dict[str, Any], suffix: str | None, staging: OutputStaging) -> list[str]:
    """Move the files of the response's stage record into ``staging`` under the command's
    names."""
    record = StageOutputs.model_validate(stage)
    written = []
    for kind in OUTPUT_KINDS:
        for channel, source in enumerate(stage_files(record, kind)):
            name = CLI_LAYOUT.name(kind, 0, suffix, channel)
            Path(source).replace(staging.path(name))
            written.append(str(staging.final_path(name)))
    return written


def run_by_upload(args: argparse.Namespace, request: InferenceRequest) -> str:
    """Run ``request`` on the server at --url; returns the log line of what was written."""
    study = Path(request.study_path or ".")
    fields = upload_fields(request)
    with tempfile.TemporaryDirectory(prefix="nnunet-bento-upload-") as work:
        with Client(args.url, token=args.token) as client:
            response = client.infer_study(
                study, Path(work) / "result", study_members(request), **fields
            )
        output = Path(args.output_dir).resolve()
        settings = load_settings()
        with OutputStaging(output, settings.nnunet_bento_work_dir, overwrite=True) as staging:
            written = rename_outputs(response["stages"][0], request.suffix, staging)
    return f"{request.nnunet_id} on {response['device']} at {args.url}: wrote {', '.join(written)}"
