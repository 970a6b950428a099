"""scripts/build-image: build the Bento (scripts/build-bento) and containerize it.

With no options, on a machine with Docker and a registry: the CUDA image from BentoML's
default base (python:3.11-slim, torch from PyPI, whose Linux wheels carry CUDA), exactly
what `scripts/build-bento && bentoml containerize nnunet-bento:latest` makes.

- ``--cpu``: a CPU-only torch, for tests and CPU hosts: the CPU wheel that
  `pip download --no-index torch==<the .venv's version>` finds locally (pip's find-links),
  or ``--torch-wheel FILE``, or else torch from the PyTorch CPU index.
- ``--base-image``: another base. BentoML then installs neither Python nor system packages,
  so it must hold python3.11, libgl1 and libglib2.0-0 (scripts/container/make-base-image
  makes one without a registry).
- ``--ca-bundle FILE``: an intercepting proxy's CA bundle, mounted at build time only
  (podman, buildah), with SSL_CERT_FILE (read by uv and OpenSSL) and PIP_CERT set for the
  build steps only; nothing of it stays in the image.
- ``--dockerfile-only PATH``: build the Bento and write the Dockerfile that
  `bentoml containerize` would build, without any container engine.

podman and buildah build with ``--format docker`` (OCI images drop HEALTHCHECK) and
``--network host``. On hosts without systemd or CAP_SYS_RESOURCE they need a
containers.conf: set CONTAINERS_CONF (scripts/container/engine-env.sh writes one).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
WORK = Path("build/container")  # under the repository (build/ is ignored by git)
ENGINES = ("docker", "podman", "buildah")
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CA_TARGET = "/etc/ssl/certs/ca-certificates.crt"


def log(message: str) -> None:
    print(f"build-image: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/build-image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="container engine; default: docker if its daemon answers, else podman, else buildah",
    )
    parser.add_argument(
        "--base-image",
        help="base image (must hold python3.11, libgl1, libglib2.0-0); "
        "default: BentoML's python:3.11-slim with those installed",
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        metavar="FILE",
        help="CA bundle (PEM) of an intercepting HTTPS proxy, trusted during the build only "
        "(podman, buildah)",
    )
    parser.add_argument("--cpu", action="store_true", help="CPU-only torch (no CUDA)")
    parser.add_argument(
        "--torch-wheel",
        type=Path,
        metavar="FILE",
        help="with --cpu: the torch wheel to install (default: found as described above)",
    )
    parser.add_argument(
        "--tag",
        help="image tag (default: nnunet-bento:latest, with --cpu nnunet-bento:latest-cpu)",
    )
    parser.add_argument(
        "--bento",
        metavar="TAG",
        help="containerize this Bento from the store instead of building one",
    )
    parser.add_argument(
        "--dockerfile-only",
        type=Path,
        metavar="PATH",
        help="write the Dockerfile `bentoml containerize` would build to PATH and stop "
        "(no engine needed)",
    )
    parser.add_argument(
        "--engine-opt",
        action="append",
        default=[],
        metavar="ARG=VALUE",
        help="extra `bentoml containerize --opt` (repeatable), e.g. no-cache",
    )
    return parser.parse_args(argv)


def engine_answers(engine: str) -> bool:
    """Whether the engine is installed and, for docker, its daemon answers."""
    if shutil.which(engine) is None:
        return False
    if engine != "docker":
        return True
    probe = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


def detect_engine() -> str:
    for engine in ENGINES:
        if engine_answers(engine):
            return engine
    found = [engine for engine in ENGINES if shutil.which(engine)]
    hint = " (docker is installed but its daemon does not answer)" if "docker" in found else ""
    raise SystemExit(
        f"build-image: no container engine found{hint}; install docker or podman "
        "(scripts/test-container installs podman), or use --dockerfile-only"
    )


def venv_torch_version() -> str:
    """The torch version of this interpreter's environment, without a local label."""
    return importlib.metadata.version("torch").split("+")[0]


def local_cpu_torch_wheel(dest: Path) -> Path | None:
    """The local CPU wheel of the .venv's torch version, as pip finds it, or None.

    `--no-index` keeps pip to its find-links (pip.conf, PIP_FIND_LINKS): it never downloads
    the CUDA wheel from PyPI here.
    """
    version = venv_torch_version()
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("torch-*.whl"):
        old.unlink()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(dest),
            f"torch=={version}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = [wheel for wheel in dest.glob("torch-*.whl") if "+cpu" in wheel.name]
    if completed.returncode != 0 or not wheels:
        for wheel in dest.glob("torch-*.whl"):
            wheel.unlink()
        return None
    return wheels[0]


def place_wheel(wheel: Path, dest: Path) -> Path:
    """Link (or copy) the wheel under the build context, where bentofile paths may point."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / wheel.name
    if target.resolve() == wheel.resolve():
        return target
    for old in dest.glob("torch-*.whl"):
        old.unlink()
    try:
        os.link(wheel, target)
    except OSError:
        shutil.copy2(wheel, target)
    return target


def variant_bentofile(args: argparse.Namespace) -> Path:
    """bentofile.yaml, or a variant of it for --cpu and --base-image under build/container."""
    if not args.cpu and not args.base_image:
        return Path("bentofile.yaml")
    config = yaml.safe_load(Path("bentofile.yaml").read_text())
    docker = config.setdefault("docker", {})
    python = config.setdefault("python", {})
    if args.base_image:
        docker["base_image"] = args.base_image
        # Ignored by BentoML with a base image (it warns); the base must bring them.
        docker.pop("system_packages", None)
        docker.pop("python_version", None)
        docker.pop("distro", None)
    if args.cpu:
        wheels_dir = WORK / "wheels"
        wheel = (
            place_wheel(args.torch_wheel, wheels_dir)
            if args.torch_wheel
            else local_cpu_torch_wheel(wheels_dir)
        )
        packages = python.get("packages") or []
        if wheel is not None:
            log(f"CPU torch from {wheel.name}")
            # requirements.txt is installed before the wheels: a torch line there would
            # download the CUDA build first.
            python["packages"] = [p for p in packages if not re.match(r"torch\b", p)]
            python["wheels"] = [*python.get("wheels", []), str(wheel)]
        else:
            log(f"no local CPU torch wheel: torch from {PYTORCH_CPU_INDEX}")
            python["extra_index_url"] = [*python.get("extra_index_url", []), PYTORCH_CPU_INDEX]
        config.setdefault("labels", {})["variant"] = "cpu"
    path = WORK / "bentofile.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by scripts/build-image from bentofile.yaml; do not edit.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def build_bento(bentofile: Path) -> str:
    """scripts/build-bento with this bentofile; the new Bento's tag."""
    completed = subprocess.run(
        ["scripts/build-bento", "--bentofile", str(bentofile), "--output", "tag"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )
    sys.stderr.write(completed.stdout)
    if completed.returncode != 0:
        raise SystemExit(f"build-image: scripts/build-bento failed ({completed.returncode})")
    tags = re.findall(r"__tag__:(\S+)", completed.stdout)
    if not tags:
        raise SystemExit("build-image: bentoml build printed no tag")
    return tags[-1]


def containerize_cwd() -> str:
    """The folder to run BentoML's containerize steps in: the temporary folder.

    BentoML 1.4.40 re-resolves the bento's Dockerfile.template inside a temporary build
    context and refuses it unless that lies under the working folder ("Accessing file
    outside of current working directory is not allowed", bentoml/BentoML#5566).
    """
    return tempfile.gettempdir()


def write_dockerfile(bento_tag: str, path: Path) -> None:
    """The Dockerfile that `bentoml containerize` (docker, BuildKit) builds for this Bento."""
    import bentoml

    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(containerize_cwd())
    try:
        bentoml.container.get_containerfile(bento_tag, output_path=str(path), enable_buildkit=True)
    finally:
        os.chdir(here)


def containerize_command(
    args: argparse.Namespace, engine: str, bento_tag: str, image_tag: str
) -> list[str]:
    command = [
        str(Path(sys.executable).absolute()),
        "-m",
        "bentoml",
        "containerize",
        bento_tag,
        "--backend",
        engine,
        "--image-tag",
        image_tag,
    ]
    opts: list[str] = []
    if engine in ("podman", "buildah"):
        opts += ["format=docker", "network=host"]
    if args.ca_bundle:
        opts += [
            f"volume={args.ca_bundle.resolve()}:{CA_TARGET}:ro",
            f"build-arg=SSL_CERT_FILE={CA_TARGET}",
            f"build-arg=PIP_CERT={CA_TARGET}",
        ]
    opts += args.engine_opt
    for opt in opts:
        command += ["--opt", opt]
    return command


def image_size(engine: str, image_tag: str) -> int | None:
    runner = "podman" if engine == "buildah" and shutil.which("podman") else engine
    if runner == "buildah":
        return None
    completed = subprocess.run(
        [runner, "image", "inspect", "--format", "{{.Size}}", image_tag],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return int(completed.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("ca_bundle", "torch_wheel", "dockerfile_only"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    os.chdir(REPO)
    if args.ca_bundle and not args.ca_bundle.is_file():
        raise SystemExit(f"build-image: --ca-bundle {args.ca_bundle}: no such file")
    if args.torch_wheel and not args.cpu:
        raise SystemExit("build-image: --torch-wheel goes with --cpu")
    if args.torch_wheel and not args.torch_wheel.is_file():
        raise SystemExit(f"build-image: --torch-wheel {args.torch_wheel}: no such file")
    engine = None
    if args.dockerfile_only is None:
        engine = args.engine or detect_engine()
        if not engine_answers(engine):
            raise SystemExit(f"build-image: {engine} is not installed or does not answer")
        if args.ca_bundle and engine == "docker":
            raise SystemExit(
                "build-image: --ca-bundle needs podman or buildah: `docker build` cannot mount "
                "a host file into its build steps without copying it into a layer "
                "(docs/container.md)"
            )
    timings: dict[str, float] = {}
    start = time.monotonic()
    bento_tag = args.bento or build_bento(variant_bentofile(args))
    timings["bento"] = time.monotonic() - start
    log(f"Bento {bento_tag}")
    if args.dockerfile_only is not None:
        write_dockerfile(bento_tag, args.dockerfile_only)
        log(f"Dockerfile written to {args.dockerfile_only}")
        print(json.dumps({"bento": bento_tag, "dockerfile": str(args.dockerfile_only)}))
        return 0
    assert engine is not None
    image_tag = args.tag or ("nnunet-bento:latest-cpu" if args.cpu else "nnunet-bento:latest")
    command = containerize_command(args, engine, bento_tag, image_tag)
    log(" ".join(command[1:]))
    env = dict(os.environ)
    if engine in ("podman", "buildah"):
        env["BUILDAH_FORMAT"] = "docker"  # BentoML sets oci, which drops HEALTHCHECK
    start = time.monotonic()
    # Its output goes to stderr: stdout carries only the result line.
    completed = subprocess.run(
        command, env=env, cwd=containerize_cwd(), stdout=sys.stderr, check=False
    )
    timings["containerize"] = time.monotonic() - start
    if completed.returncode != 0:
        log(f"bentoml containerize failed ({completed.returncode})")
        return completed.returncode
    size = image_size(engine, image_tag)
    result = {
        "bento": bento_tag,
        "image": image_tag,
        "engine": engine,
        "size_bytes": size,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    log(
        f"image {image_tag}"
        + (f": {size / 1e9:.2f} GB" if size else "")
        + f" (bento {timings['bento']:.0f} s, containerize {timings['containerize']:.0f} s)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
