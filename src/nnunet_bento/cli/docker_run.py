"""`scripts/docker-run`: run `nnunet-bento predict` inside the Bento's container image.

It takes the flags of `nnunet-bento predict` plus ``-c IMAGE``, mounts every input, output,
model and metadata path into the container, and runs the command there, as nnunet_serve's
entrypoint-with-docker.py did.
"""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from .predict import add_predict_arguments

#: predict flags whose value is a path on the host, and whether the container may write it.
PATH_FLAGS = {
    "series_paths": False,
    "model_path": False,
    "metadata_path": False,
    "fractional_metadata_path": False,
    "empty_segment_metadata": False,
    "intersect_with": False,
    "output_dir": True,
    "log_file": True,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="docker-run",
        description="Run `nnunet-bento predict` in the container image built from the Bento.",
    )
    add_predict_arguments(parser)
    parser.add_argument("--container", "-c", required=True, help="Docker image to run")
    parser.add_argument("--gpus", default="all", help="value of docker run --gpus ('' for none)")
    parser.add_argument(
        "--engine",
        choices=["docker", "podman"],
        default=os.environ.get("NNUNET_BENTO_ENGINE", "docker"),
        help="container engine (default: NNUNET_BENTO_ENGINE or docker); podman takes the GPUs "
        "as CDI devices (nvidia.com/gpu=...)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    return parser


class Mounts:
    """Host folders mounted at /data/<n>/<folder name>, each once, read-only unless written.

    Folder names are kept, so a model folder keeps its name (the model id) in the container.
    """

    def __init__(self) -> None:
        self.folders: dict[Path, tuple[str, bool]] = {}

    def container_path(self, host: Path, writable: bool, folder: bool) -> str:
        """Where ``host`` appears in the container; its folder (or itself) gets mounted."""
        host = host.resolve()
        mounted = host if folder else host.parent
        default = (f"/data/{len(self.folders)}/{mounted.name}", False)
        target, was_writable = self.folders.get(mounted, default)
        self.folders[mounted] = (target, was_writable or writable)
        return target if folder else f"{target}/{host.name}"

    def options(self) -> list[str]:
        return [
            option
            for host, (target, writable) in self.folders.items()
            for option in ("-v", f"{host}:{target}:{'rw' if writable else 'ro'}")
        ]


def predict_argv(
    args: argparse.Namespace, parser: argparse.ArgumentParser, mounts: Mounts
) -> list[str]:
    """The predict command line for the container, host paths replaced by mounted ones."""
    argv = []
    for action in parser._actions:
        if action.dest in ("help", "container", "gpus", "dry_run", "engine"):
            continue
        value = getattr(args, action.dest)
        flag = action.option_strings[0]
        if value is False and isinstance(action, argparse.BooleanOptionalAction):
            argv.append(f"--no-{flag.removeprefix('--')}")
            continue
        if value is None or value is False or value == action.default:
            continue
        if action.dest in PATH_FLAGS:
            writable = PATH_FLAGS[action.dest]
            values = value if isinstance(value, list) else [value]
            paths = []
            for item in values:
                host = Path(item)
                is_folder = action.dest == "output_dir" or host.is_dir()
                if action.dest == "model_path" and not host.exists():
                    paths.append(str(item))
                    continue
                if action.dest == "output_dir":
                    host.mkdir(parents=True, exist_ok=True)
                paths.append(mounts.container_path(host, writable, is_folder))
            argv += [flag, *paths]
        elif value is True:
            argv.append(flag)
        else:
            argv += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def gpu_options(engine: str, gpus: str) -> list[str]:
    """Docker's --gpus, or podman's CDI device for the same GPUs."""
    if not gpus:
        return []
    return ["--gpus", gpus] if engine == "docker" else ["--device", f"nvidia.com/gpu={gpus}"]


def docker_command(argv: list[str]) -> list[str]:
    """The whole `docker run` command for these predict flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mounts = Mounts()
    inner = predict_argv(args, parser, mounts)
    user = ["--user", f"{os.getuid()}:{os.getgid()}"]
    return [
        args.engine,
        "run",
        "--rm",
        *gpu_options(args.engine, args.gpus),
        *user,
        *mounts.options(),
        "--entrypoint",
        "nnunet-bento",
        args.container,
        "predict",
        *inner,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = docker_command(argv)
    if "--dry-run" in argv:
        print(shlex.join(command))
        return 0
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
