"""scripts/build-image without a container engine: the Dockerfile of the default (CUDA) path
and of the CPU variant, the engine choice, the containerize options. The image itself is
built and run by scripts/test-container (docs/container.md)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

CA_TARGET = "/etc/ssl/certs/ca-certificates.crt"


def load_build_image():
    spec = importlib.util.spec_from_file_location(
        "build_image", REPO / "scripts" / "container" / "build_image.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_image = load_build_image()


def render(bentofile: dict, tmp_path: Path, enable_buildkit: bool = True) -> str:
    """The Dockerfile BentoML renders for this bentofile (what `bentoml build` stores in
    env/docker/Dockerfile and `bentoml containerize` builds), with our template hook."""
    from bentoml._internal.bento.build_config import BentoBuildConfig
    from bentoml._internal.container.generate import generate_containerfile

    config = BentoBuildConfig.from_yaml(yaml.safe_dump(bentofile)).with_defaults()
    bento_fs = tmp_path / "bento"
    bento_fs.mkdir(exist_ok=True)
    here = os.getcwd()
    os.chdir(REPO)  # BentoML resolves the template against the working folder
    try:
        return generate_containerfile(
            config.docker,
            str(REPO),
            conda=config.conda,
            bento_fs=bento_fs,
            enable_buildkit=enable_buildkit,
        )
    finally:
        os.chdir(here)


def bentofile() -> dict:
    return yaml.safe_load((REPO / "bentofile.yaml").read_text())


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def env_of(dockerfile: str) -> dict[str, str]:
    """ENV values, with `ARG X=v` / `ENV X=$X` pairs resolved."""
    args, env = {}, {}
    for line in instructions(dockerfile):
        word, _, rest = line.partition(" ")
        if word in ("ARG", "ENV") and "=" in rest:
            key, _, value = rest.partition("=")
            value = value.strip('"')
            if value == f"${key}":
                value = args.get(key, "")
            (args if word == "ARG" else env)[key] = value
    return env


def assert_serving_image(dockerfile: str) -> None:
    lines = instructions(dockerfile)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] == "bentoml", users  # the last USER is not root
    health = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert len(health) == 1 and "/readyz" in health[0]
    assert lines[-1].startswith("HEALTHCHECK") or "ENTRYPOINT" in " ".join(lines[-3:])
    env = env_of(dockerfile)
    assert env["NNUNET_BENTO_INPUT_ROOTS"] == "/data/in"
    assert env["NNUNET_BENTO_OUTPUT_ROOT"] == "/data/out"
    assert env["NNUNET_SERVE_HOST"] == "0.0.0.0"
    assert env["NNUNET_SERVE_PORT"] == "3000"
    assert env["MODEL_SERVE_SPEC"] == "/home/bentoml/bento/src/model-serve-spec.yaml"
    assert "EXPOSE 3000" in lines
    assert any("mkdir -p /data/in /data/out" in line for line in lines)
    # No CA bundle baked in: nothing copied into /etc/ssl, no certificate variable in the
    # image's environment; the build-time ARGs have no default.
    for line in lines:
        if line.startswith(("COPY", "ADD")):
            assert "ssl" not in line and ".crt" not in line and ".pem" not in line, line
    assert not {"SSL_CERT_FILE", "PIP_CERT", "UV_NATIVE_TLS", "REQUESTS_CA_BUNDLE"} & set(env)
    assert "ARG SSL_CERT_FILE" in lines and "ARG PIP_CERT" in lines


def test_default_cuda_path_dockerfile(tmp_path):
    dockerfile = render(bentofile(), tmp_path)
    assert_serving_image(dockerfile)
    lines = instructions(dockerfile)
    # BentoML's default base with the system packages; torch comes from PyPI (CUDA wheels)
    assert lines[0].startswith("FROM python:3.11-slim")
    assert any("libgl1" in line and "libglib2.0-0" in line for line in lines)
    assert "torch>=2.1.2,!=2.9.*" in bentofile()["python"]["packages"]


def test_base_image_variant_dockerfile(tmp_path):
    config = bentofile()
    config["docker"]["base_image"] = "localhost/nnunet-bento-base:bookworm"
    for key in ("system_packages", "python_version"):
        config["docker"].pop(key)
    dockerfile = render(config, tmp_path, enable_buildkit=False)
    assert_serving_image(dockerfile)
    assert instructions(dockerfile)[0].startswith("FROM localhost/nnunet-bento-base:bookworm")


def test_build_image_help():
    completed = subprocess.run(
        [str(REPO / "scripts" / "build-image"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for option in (
        "--engine",
        "--base-image",
        "--ca-bundle",
        "--cpu",
        "--tag",
        "--dockerfile-only",
    ):
        assert option in completed.stdout


def test_cpu_variant_takes_torch_from_the_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")
    monkeypatch.setattr(build_image, "WORK", tmp_path / "work")
    monkeypatch.chdir(REPO)
    args = build_image.parse_args(
        ["--cpu", "--torch-wheel", str(wheel), "--base-image", "localhost/base:1"]
    )
    variant = yaml.safe_load(build_image.variant_bentofile(args).read_text())
    # no torch requirement: it would install the CUDA build before the wheels
    assert not [p for p in variant["python"]["packages"] if p.startswith("torch")]
    assert variant["python"]["wheels"][0] == "dist/nnunet_bento-0.1.0-py3-none-any.whl"
    assert variant["python"]["wheels"][1].endswith(wheel.name)
    assert variant["docker"]["base_image"] == "localhost/base:1"
    assert "system_packages" not in variant["docker"]
    # everything else as in bentofile.yaml
    assert variant["docker"]["dockerfile_template"] == bentofile()["docker"]["dockerfile_template"]
    assert variant["docker"]["env"] == bentofile()["docker"]["env"]
    assert variant["include"] == bentofile()["include"]


def test_without_options_the_bentofile_is_used_as_it_is():
    args = build_image.parse_args([])
    assert build_image.variant_bentofile(args) == Path("bentofile.yaml")


def test_podman_build_keeps_healthcheck_and_mounts_the_ca_bundle_only(tmp_path):
    bundle = tmp_path / "proxy-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    args = build_image.parse_args(["--ca-bundle", str(bundle)])
    command = build_image.containerize_command(args, "podman", "nnunet-bento:x", "img:1")
    opts = [command[i + 1] for i, part in enumerate(command) if part == "--opt"]
    assert "format=docker" in opts
    assert f"volume={bundle}:{CA_TARGET}:ro" in opts
    assert f"build-arg=SSL_CERT_FILE={CA_TARGET}" in opts
    assert command[command.index("--backend") + 1] == "podman"
    assert command[command.index("--image-tag") + 1] == "img:1"


def test_docker_with_a_ca_bundle_is_refused(tmp_path, monkeypatch):
    bundle = tmp_path / "proxy-ca.pem"
    bundle.write_text("x")
    monkeypatch.setattr(build_image, "engine_answers", lambda engine: True)
    with pytest.raises(SystemExit, match="--ca-bundle needs podman or buildah"):
        build_image.main(["--engine", "docker", "--ca-bundle", str(bundle)])


def fake_engines(tmp_path: Path, docker_daemon: bool) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"#!/bin/sh\nexit {0 if docker_daemon else 1}\n")
    (bin_dir / "podman").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": str(bin_dir)}


@pytest.mark.parametrize(("daemon", "expected"), [(True, "docker"), (False, "podman")])
def test_engine_is_docker_only_when_its_daemon_answers(tmp_path, daemon, expected):
    env = fake_engines(tmp_path, daemon)
    script = str(REPO / "scripts" / "container" / "build_image.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('b', {script!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.detect_engine())\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == expected


@pytest.mark.slow
def test_build_image_writes_the_dockerfile_without_an_engine(tmp_path):
    """The real path: scripts/build-bento (wheel, models, bentoml build) and the Dockerfile
    that `bentoml containerize` would build, in a store of its own."""
    out = tmp_path / "Dockerfile"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    completed = subprocess.run(
        [str(REPO / "scripts" / "build-image"), "--dockerfile-only", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    dockerfile = out.read_text()
    assert_serving_image(dockerfile)
    assert instructions(dockerfile)[0].startswith("FROM python:3.11-slim")
    # the Bento holds the spec's models, so the image starts without a network
    bentos = list((tmp_path / "bentoml" / "bentos" / "nnunet-bento").iterdir())
    bento = next(b for b in bentos if (b / "bento.yaml").exists())
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    models = info["models"] + [m for service in info["services"] for m in service["models"]]
    packed = {model["tag"].split(":")[0] for model in models}
    assert packed == {model["tag"].split(":")[0] for model in spec["models"]}
