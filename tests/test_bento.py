"""The Bento: what `bentoml build` packs, its Dockerfile, export and import, the container
command of scripts/docker-run, and the two services scaled apart."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import bentoml
import pytest
import yaml
from conftest import REPO, bentoml_serve, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bento(imported_models) -> Path:
    """The Bento built from the repository, as scripts/build-bento builds it."""
    subprocess.run(
        ["bash", "scripts/build-bento", "--version", "test"],
        cwd=REPO,
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
    )
    return Path(bentoml.get("nnunet-bento:test").path)


def test_bento_packs_the_service_the_spec_the_library_and_the_models(bento, imported_models):
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["entry_service"] == "SegmentationService"
    runner = next(s for s in info["services"] if s["name"] == "ModelRunner")
    assert runner["config"]["resources"] == {"gpu": 1}
    assert {m["tag"] for m in runner["models"]} == set(imported_models.values())
    for packed in ("service.py", "model-serve-spec.yaml", "examples/metadata/organ.json"):
        assert (bento / "src" / packed).is_file(), packed
    assert [w.name for w in (bento / "env" / "python" / "wheels").iterdir()] == [
        "nnunet_bento-0.1.0-py3-none-any.whl"
    ]


def test_dockerfile_installs_a_cuda_torch_without_a_cuda_base_image(bento):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "nvidia/cuda" not in dockerfile
    assert "libgl1" in dockerfile and "libglib2.0-0" in dockerfile
    assert "ENV MODEL_SERVE_SPEC=$MODEL_SERVE_SPEC" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert "torch>=2.1.2,!=2.9.*" in requirements, "PyPI's torch wheels carry CUDA"
    assert not [line for line in requirements if "+cpu" in line or "download.pytorch.org" in line]
    install = (bento / "env" / "python" / "install.sh").read_text()
    assert "wheels" in install


def test_exported_bento_serves_from_another_store(bento, demo_study, tmp_path):
    archive = tmp_path / "nnunet-bento.bento"
    subprocess.run(
        [sys.executable, "-m", "bentoml", "export", "nnunet-bento:test", str(archive)],
        check=True,
        capture_output=True,
    )
    home = tmp_path / "other-store"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "bentoml", "import", str(archive)],
        check=True,
        capture_output=True,
        env=env,
    )
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "nnunet-bento:test",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = bentoml.SyncHTTPClient(f"http://127.0.0.1:{port}", server_ready_timeout=180)
        assert {"organ", "organ2d", "lesion", "organ_nomirror"} <= set(client.model_info())
        response = client.infer(
            nnunet_id="organ2d",
            study_path=str(demo_study),
            series_folders=["T2"],
            output_dir=str(tmp_path / "out"),
        )
        assert Path(response["nifti_prediction"][0]).is_file()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_runner_and_api_service_scaled_apart(imported_models, demo_study, tmp_path):
    runner_port = free_port()
    runner_log = tmp_path / "runner.log"
    with open(runner_log, "wb") as log:
        runner = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nnunet_bento.server.serve_one",
                "ModelRunner",
                "--host",
                "127.0.0.1",
                "--port",
                str(runner_port),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MODEL_SERVE_SPEC": str(REPO / "model-serve-spec.yaml")},
        )
    try:
        bentoml.SyncHTTPClient(f"http://127.0.0.1:{runner_port}", server_ready_timeout=180)
        with bentoml_serve(
            REPO / "model-serve-spec.yaml",
            tmp_path / "api.log",
            command=[
                sys.executable,
                "-m",
                "nnunet_bento.server.serve_one",
                "SegmentationService",
                "--runner-url",
                f"http://127.0.0.1:{runner_port}",
                "--host",
                "127.0.0.1",
            ],
        ) as api:
            response = api.client.infer(
                nnunet_id="organ2d",
                study_path=str(demo_study),
                series_folders=["T2"],
                output_dir=str(tmp_path / "out"),
            )
            assert Path(response["nifti_prediction"][0]).is_file()
        assert "path=/run_network" in runner_log.read_text(), "the API used the remote runner"
        assert "ModelRunner initialized" not in (tmp_path / "api.log").read_text()
    finally:
        os.killpg(runner.pid, signal.SIGTERM)
        runner.wait(timeout=30)
