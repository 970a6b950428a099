"""`nnunet-bento predict`: nnunet_serve's standalone command, on the same pipeline as /infer."""

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..catalog.registry import Registry, build_registry, weights_source
from ..catalog.spec import MetadataPath, ModelEntry, ServeSpec, load_spec
from ..errors import NnunetBentoError, RequestError
from ..io.work_folder import claim_work_folder, prepare_work_folder
from ..pacs.nodes import load_nodes
from ..pipeline import SegmentationPipeline
from ..plan import CLI_LAYOUT
from ..request import OUTPUT_FIELDS, STEPS, InferenceRequest, field_help
from ..runners.device import DeviceSelector
from ..runners.nnunet_runner import RunnerModel, RunnerSet
from ..settings import load_settings
from .status_report import JobReporter

logger = logging.getLogger("nnunet_bento.predict")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of nnunet_serve's entrypoint-prod.py, with its long and short names.

    A per-model flag that is not given stays None, so that the model's default_args apply;
    its help is the request field's description and server default.
    """
    add = parser.add_argument
    add(
        "--series_paths",
        "-i",
        nargs="+",
        required=True,
        help="Path to input series (with --dicom_source: SeriesInstanceUIDs or SeriesDescriptions)",
    )
    add(
        "--dicom_source",
        metavar="NODE",
        help="Pull the series from this DICOM node of NNUNET_BENTO_DICOM_NODES (needs --study_uid)",
    )
    add(
        "--push_to",
        nargs="+",
        metavar="NODE",
        help="Send the DICOM outputs to these DICOM nodes of NNUNET_BENTO_DICOM_NODES",
    )
    add(
        "--model_path",
        "-m",
        required=True,
        help="nnU-Net model folder, a model id of MODEL_SERVE_SPEC, or a Bento model tag",
    )
    add("--checkpoint_name", "-ckpt", help=field_help("checkpoint_name"))
    add("--output_dir", "-o", required=True, help="Path to output directory")
    add("--metadata_path", "-M", help="Path to metadata template for DICOM-Seg output")
    add(
        "--fractional_metadata_path",
        help="Path to metadata template for fractional DICOM-Seg output (defaults to "
        "--metadata_path)",
    )
    add("--empty_segment_metadata", help="Path to metadata template for when predictions are empty")
    add(
        "--fractional_as_segments",
        action="store_const",
        const=True,
        help=field_help("fractional_as_segments"),
    )
    add(
        "--study_uid",
        "-s",
        help="Study UID if series are SimpleITK-readable files (recorded in the job log; DICOM "
        "outputs take their study from DICOM inputs)",
    )
    add("--folds", "-f", nargs="+", help=field_help("use_folds"))
    add("--tta", "-t", action=argparse.BooleanOptionalAction, help=field_help("tta"))
    add(
        "--tmp_dir",
        help="Accepted for compatibility and not used: outputs are staged inside --output_dir "
        "and moved when done",
    )
    add(
        "--is_dicom",
        "-D",
        action="store_true",
        help="Assumes input is DICOM (and also converts to DICOM seg; prediction.dcm in "
        "output_dir)",
    )
    add(
        "--proba_map",
        "-p",
        action="store_const",
        const=True,
        help=f"{field_help('save_proba_map')} Written as probabilities.nii.gz in output_dir.",
    )
    add("--proba_threshold", type=float, help=field_help("proba_threshold"))
    add("--min_confidence", type=float, help=field_help("min_confidence"))
    add(
        "--rt_struct_output",
        action="store_true",
        help="Produces a DICOM RT Struct file (struct.dcm in output_dir)",
    )
    add(
        "--save_nifti_inputs",
        "-S",
        action="store_true",
        help="Moves Nifti inputs to output folder (volume_XXXX.nii.gz in output_dir)",
    )
    add("--intersect_with", help=field_help("intersect_with"))
    add("--min_intersection", type=float, help=field_help("min_intersection"))
    add("--class_idx", type=int, nargs="+", help=field_help("class_idx"))
    add("--suffix", help="Adds a suffix (_suffix) to the outputs if specified.")
    add(
        "--preview",
        action="store_true",
        help="Draws preview.png in output_dir: three slices through the mask with each "
        "label's outline, volume and component count",
    )
    add(
        "--statistics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Write statistics.json: per label, volume (ml), components, centroid and "
        "bounding box (LPS mm), intensity and mean probability. Default: on",
    )
    add(
        "--dicom_sr",
        action="store_true",
        help="Also write measurements.dcm, a DICOM SR (TID 1500) of the measurements that "
        "references the DICOM-SEG's segments (needs --is_dicom)",
    )
    add("--job_id", help="Job ID that will be used to post job status/create log file")
    add("--update_url", help="URL to be used to post job status")
    add("--success_message", default="success", help="Message to be posted in case of success")
    add("--failure_message", default="failure", help="Message to be posted in case of failure")
    add(
        "--log_file", type=Path, help="Path to log file (with job_id, and success/failure messages)"
    )
    add(
        "--url",
        help="Run on the nnunet-bento server at this URL: the series are uploaded and the "
        "outputs downloaded (-m names a model id of that server)",
    )
    add("--token", help="Bearer token for --url (the server's NNUNET_BENTO_API_TOKEN)")
    add("--debug", action="store_true", help="Enters debug mode")


def model_entry_and_spec(args: argparse.Namespace) -> ServeSpec:
    """A one-model spec for --model_path: a result folder, a spec id, or a Bento tag."""
    metadata = {
        "metadata": args.metadata_path,
        "fractional_metadata": args.fractional_metadata_path,
        "empty_segment_metadata": args.empty_segment_metadata,
    }
    overrides = {k: MetadataPath(path=Path(v).resolve()) for k, v in metadata.items() if v}
    model = Path(args.model_path)
    if model.is_dir():
        entry = ModelEntry(id=model.resolve().name, rel_path=model.resolve().name, **overrides)
        return ServeSpec(model_folder=model.resolve().parent, models=[entry])
    spec_path = load_settings().model_serve_spec
    if spec_path.is_file():
        spec = load_spec(spec_path)
        for entry in spec.models:
            if args.model_path in entry.names:
                return spec.model_copy(update={"models": [entry.model_copy(update=overrides)]})
    entry = ModelEntry(id=args.model_path.split(":")[0], tag=args.model_path, **overrides)
    return ServeSpec(models=[entry])


def study_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Where the series come from: a DICOM node and study, or local paths under their
    common folder (with the --intersect_with mask)."""
    if args.dicom_source:
        if not args.study_uid:
            raise RequestError("--dicom_source needs --study_uid, the study to pull")
        source = {"node": args.dicom_source, "study_uid": args.study_uid}
        return {"dicom_source": source, "series_folders": args.series_paths}
    series = [Path(p).resolve() for p in args.series_paths]
    mask = Path(args.intersect_with).resolve() if args.intersect_with else None
    study = Path(os.path.commonpath([p.parent for p in [*series, *([mask] if mask else [])]]))
    return {
        "study_path": str(study),
        "series_folders": [str(p.relative_to(study)) for p in series],
        "intersect_with": str(mask.relative_to(study)) if mask else None,
    }


def request_from(args: argparse.Namespace, model_id: str) -> InferenceRequest:
    """The /infer request that the flags stand for."""
    return InferenceRequest(
        nnunet_id=model_id,
        **study_fields(args),
        output_dir=str(Path(args.output_dir).resolve()),
        checkpoint_name=args.checkpoint_name,
        use_folds=args.folds and [int(f) if f.isdigit() else f for f in args.folds],
        tta=args.tta,
        is_dicom=args.is_dicom,
        save_proba_map=args.proba_map,
        proba_threshold=args.proba_threshold,
        min_confidence=args.min_confidence,
        save_rt_struct_output=args.rt_struct_output,
        save_nifti_inputs=args.save_nifti_inputs,
        min_intersection=args.min_intersection,
        class_idx=args.class_idx,
        fractional_as_segments=args.fractional_as_segments,
        suffix=args.suffix,
        save_preview=args.preview,
        save_statistics=args.statistics,
        save_dicom_sr=args.dicom_sr,
        overwrite=True,
        push_to=args.push_to,
        **({"tmp_dir": args.tmp_dir} if args.tmp_dir else {}),
    )


def local_pipeline(registry: Registry) -> SegmentationPipeline:
    """The pipeline with in-process runners: no server."""
    settings = load_settings()
    runners = RunnerSet(
        {m.id: RunnerModel(m.folder, m.entry.min_mem) for m in registry.models.values()},
        DeviceSelector.for_this_machine(settings.nnunet_bento_gpu_wait_s),
        cache_size=1,
    )
    nodes = (
        load_nodes(settings.nnunet_bento_dicom_nodes) if settings.nnunet_bento_dicom_nodes else {}
    )
    return SegmentationPipeline(registry, runners, CLI_LAYOUT, settings=settings, dicom_nodes=nodes)


def run_predict(args: argparse.Namespace) -> str:
    """Run the request; returns the log line that says what was written."""
    registry = build_registry(model_entry_and_spec(args), weights_source(load_settings()))
    (model_id,) = registry.models
    request = request_from(args, model_id)
    interactive = sys.stderr.isatty()
    with tqdm(total=len(STEPS), desc=model_id, disable=not interactive, unit="step") as bar:

        def on_step(stage: int, step: str) -> None:
            if interactive:
                bar.n = STEPS.index(step)
                bar.set_postfix_str(step)
            else:
                logger.info("%s: %s", model_id, step)

        started = time.perf_counter()
        response = local_pipeline(registry).run(request, on_step)
        bar.n = len(STEPS)
    for warning in response.warnings:
        logger.warning(warning)
    files = [path for field in OUTPUT_FIELDS for path in getattr(response, field)]
    study = f", study {args.study_uid}" if args.study_uid else ""
    pushed = "".join(
        f"; {r['status']} on {r['node']}: {Path(r['file']).name}"
        + (f" ({r['reason']})" if r["reason"] else "")
        for r in response.push
    )
    return (
        f"{model_id} on {response.device}{study}: wrote {', '.join(files)} "
        f"in {time.perf_counter() - started:.1f} s{pushed}"
    )


def run_on_server(args: argparse.Namespace) -> str:
    """--url: the request runs on that server (the client, and BentoML, load only now)."""
    from .predict_by_upload import run_by_upload

    return run_by_upload(args, request_from(args, args.model_path))


class TerminatedError(NnunetBentoError):
    """The command received SIGTERM."""


@contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM raises TerminatedError, so that the job is reported failed and nothing is
    committed."""

    def terminate(signum: int, frame: object) -> None:
        raise TerminatedError("terminated by SIGTERM; nothing was written")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def predict(args: argparse.Namespace) -> int:
    """The command: 0 on success; one error line and 1 on failure (traceback with --debug)."""
    reporter = JobReporter(
        job_id=args.job_id,
        update_url=args.update_url,
        log_file=args.log_file,
        success_message=args.success_message,
        failure_message=args.failure_message,
    )
    try:
        with stopped_by_sigterm():
            reporter.running()
            work = prepare_work_folder(load_settings().nnunet_bento_work_dir)
            claim, _ = claim_work_folder(work)
            try:
                summary = run_on_server(args) if args.url else run_predict(args)
            finally:
                os.close(claim)
    except Exception as error:
        message = (
            str(error)
            if isinstance(error, NnunetBentoError)
            else f"{type(error).__name__}: {error}"
        )
        reporter.report(False, output_error=message)
        if args.debug:
            raise
        print(f"nnunet-bento predict: error: {message}", file=sys.stderr)
        return 1
    logger.info(summary)
    reporter.report(True, output_log=summary)
    return 0
