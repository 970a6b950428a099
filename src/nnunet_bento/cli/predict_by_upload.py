"""`nnunet-bento predict --url URL`: the same flags, run on a remote server by upload.

The series (and the --intersect_with mask) are packed, run as an upload job, and the outputs
come back under the command's own names, replacing the previous outputs in -o as a whole.
"""

import argparse
import tempfile
from pathlib import Path

from ..client import Client
from ..export import API_LAYOUT, CLI_LAYOUT
from ..io.staging import OutputStaging
from ..request import InferenceRequest
from ..settings import load_settings

SERVER_SET = {"study_path", "output_dir", "overwrite"}


def upload_fields(request: InferenceRequest) -> dict:
    """The upload's request part: what the flags gave, without what the server sets."""
    return request.model_dump(mode="json", exclude_none=True, exclude=SERVER_SET)


def study_members(request: InferenceRequest) -> list[str]:
    """The study's files to upload: the series and the mask the request names."""
    members = list(request.series_folders or [])
    return [*members, request.intersect_with] if request.intersect_with else members


def rename_outputs(result: Path, suffix: str | None, staging: OutputStaging) -> list[str]:
    """Move the stage_0 outputs of ``result`` into ``staging`` under the command's names."""
    written = []
    for kind in API_LAYOUT.templates:
        for channel in range(64 if kind == "input" else 1):
            source = result / API_LAYOUT.path(kind, 0, suffix, channel)
            if not source.is_file():
                break
            name = CLI_LAYOUT.path(kind, 0, suffix, channel)
            source.replace(staging.path(name))
            written.append(str(staging.final_path(name)))
    return written


def run_by_upload(args: argparse.Namespace, request: InferenceRequest) -> str:
    """Run ``request`` on the server at --url; returns the log line of what was written."""
    study = Path(request.study_path or ".")
    with tempfile.TemporaryDirectory(prefix="nnunet-bento-remote-") as work:
        with Client(args.url, token=args.token) as client:
            response = client.infer_study(
                study, Path(work) / "result", study_members(request), **upload_fields(request)
            )
        output = Path(args.output_dir).resolve()
        settings = load_settings()
        with OutputStaging(output, settings.nnunet_bento_work_dir, overwrite=True) as staging:
            written = rename_outputs(Path(work) / "result", request.suffix, staging)
    return f"{request.nnunet_id} on {response['device']} at {args.url}: wrote {', '.join(written)}"
