"""nnunet-bento: command-line door into the library."""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..catalog.spec import MetadataPath, load_spec
from ..catalog.store import import_model
from ..errors import NnunetBentoError, SpecError
from ..io.seg_metadata import validate_metadata
from .predict import add_predict_arguments, predict


def cmd_import_model(args: argparse.Namespace) -> None:
    result = import_model(Path(args.model_dir), args.id, args.name)
    state = "imported as" if result.created else "already in the model store as"
    print(f"{args.model_dir}: {state} {result.tag}")


def metadata_problems(path: Path) -> list[str]:
    """Problems of a DCMQI JSON template, or of every metadata object in a serve spec."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        return [f"{path}: {problem}" for problem in validate_metadata(path)]
    problems = []
    for entry in load_spec(path).models:
        for field, value in entry.metadata_fields().items():
            if value is not None:
                source = value.path if isinstance(value, MetadataPath) else value
                problems += [
                    f"{path}: model {entry.id!r}, field {field!r}: {problem}"
                    for problem in validate_metadata(source)
                ]
    return problems


def cmd_validate_metadata(args: argparse.Namespace) -> None:
    problems = [problem for path in args.paths for problem in metadata_problems(Path(path))]
    if problems:
        raise SpecError(f"{len(problems)} problem(s): " + "; ".join(problems))
    print(f"{', '.join(args.paths)}: valid DCMQI segmentation metadata")


def cmd_listen(args: argparse.Namespace) -> int:
    """`listen`: loads the client, and BentoML with it, only when it runs."""
    from .listen import listen

    return listen(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-bento", description="Serve nnU-Net v2 models with BentoML."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    predictor = commands.add_parser(
        "predict",
        help="segment series in-process, as nnunet_serve's entrypoint-prod.py",
        description="Run one nnU-Net model on the given series with the same pipeline as "
        "/infer, without a server. Handles NIfTI/MHA/NRRD and DICOM inputs; writes "
        "prediction.nii.gz, probabilities.nii.gz, volume_XXXX.nii.gz, prediction.dcm, "
        "proba.dcm and struct.dcm in --output_dir.",
    )
    add_predict_arguments(predictor)
    predictor.set_defaults(handler=predict)
    importer = commands.add_parser(
        "import-model",
        help="save an nnU-Net result folder in the Bento model store",
        description="Save an nnU-Net result folder (dataset.json, plans.json, "
        "fold_*/checkpoint_*.pth) in the Bento model store. The version is a hash of the "
        "files: importing an unchanged folder again is idempotent.",
    )
    importer.add_argument("model_dir", help="nnU-Net result folder")
    importer.add_argument("--id", required=True, help="model id (the Bento model name)")
    importer.add_argument("--name", help="user-facing name recorded with the model")
    importer.add_argument("--debug", action="store_true", help="print full tracebacks")
    importer.set_defaults(handler=cmd_import_model)
    validator = commands.add_parser(
        "validate-metadata",
        help="check DCMQI metadata templates, or the metadata of a serve spec",
        description="Check DCMQI JSON metadata templates, or every metadata object (template "
        "paths and the inline form) of a model-serve-spec.yaml, against the DCMQI schema.",
    )
    validator.add_argument("paths", nargs="+", help="template .json files or spec .yaml files")
    validator.add_argument("--debug", action="store_true", help="print full tracebacks")
    validator.set_defaults(handler=cmd_validate_metadata)
    listener = commands.add_parser(
        "listen",
        help="run the DICOM listener on its own, sending jobs to a server",
        description="Listen for DICOM (C-STORE, C-ECHO) as the file that NNUNET_BENTO_LISTENER "
        "names says, and send each settled series that a route matches to the server at --url "
        "as an upload job, with the route's request, push_to and notify (docs/hospital.md).",
    )
    listener.add_argument("--url", required=True, help="the nnunet-bento server to send jobs to")
    listener.add_argument(
        "--token", help="bearer token for --url (default: NNUNET_BENTO_API_TOKEN)"
    )
    listener.add_argument("--debug", action="store_true", help="print full tracebacks")
    listener.set_defaults(handler=cmd_listen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nnunet_bento").setLevel(logging.INFO)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return handler(args) or 0
    except NnunetBentoError as error:
        if args.debug:
            raise
        print(f"nnunet-bento {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
