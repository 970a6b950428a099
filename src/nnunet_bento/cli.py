"""nnunet-bento: command-line door into the library."""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import NnunetBentoError
from .store import import_model


def cmd_import_model(args: argparse.Namespace) -> None:
    result = import_model(Path(args.model_dir), args.id, args.name)
    state = "imported as" if result.created else "already in the model store as"
    print(f"{args.model_dir}: {state} {result.tag}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-bento", description="Serve nnU-Net v2 models with BentoML."
    )
    commands = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except NnunetBentoError as error:
        if args.debug:
            raise
        print(f"nnunet-bento {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
