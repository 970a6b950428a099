"""scripts/docker-run: the `docker run` command it builds (no engine needed with --dry-run)."""

import os
import shlex
import subprocess

from conftest import REPO

from nnunet_bento.cli.docker_run import docker_command


def test_dry_run_mounts_every_path_and_passes_every_flag(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [
            "bash",
            "scripts/docker-run",
            "-c",
            "nnunet-bento:1.0",
            "--dry-run",
            "-i",
            "examples/dicom/mr/T2",
            "examples/dicom/mr/ADC",
            "-m",
            "examples/models/lesion",
            "-M",
            "examples/metadata/lesion.json",
            "-o",
            str(out),
            "-D",
            "-f",
            "0",
            "1",
            "-t",
            "-p",
            "--proba_threshold",
            "0.1",
            "--suffix",
            "v2",
            "--log_file",
            str(tmp_path / "job.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    command = shlex.split(completed.stdout)
    assert command[:4] == ["docker", "run", "--rm", "--gpus"]
    mounts = [command[i + 1] for i, part in enumerate(command) if part == "-v"]
    assert mounts == [
        f"{REPO}/examples/dicom/mr/T2:/data/0/T2:ro",
        f"{REPO}/examples/dicom/mr/ADC:/data/1/ADC:ro",
        f"{REPO}/examples/models/lesion:/data/2/lesion:ro",
        f"{out}:/data/3/out:rw",
        f"{REPO}/examples/metadata:/data/4/metadata:ro",
        f"{tmp_path}:/data/5/{tmp_path.name}:rw",
    ]
    assert ["--user", f"{os.getuid()}:{os.getgid()}"] == command[5:7]
    inner = command[command.index("nnunet-bento:1.0") + 1 :]
    assert command[command.index("--entrypoint") + 1] == "nnunet-bento"
    assert inner == [
        "predict",
        "--series_paths",
        "/data/0/T2",
        "/data/1/ADC",
        "--model_path",
        "/data/2/lesion",
        "--output_dir",
        "/data/3/out",
        "--metadata_path",
        "/data/4/metadata/lesion.json",
        "--folds",
        "0",
        "1",
        "--tta",
        "--is_dicom",
        "--proba_map",
        "--proba_threshold",
        "0.1",
        "--suffix",
        "v2",
        "--log_file",
        f"/data/5/{tmp_path.name}/job.json",
    ]


def test_podman_gets_the_gpus_as_a_cdi_device(tmp_path):
    series = tmp_path / "T2.nii.gz"
    series.write_bytes(b"")
    command = docker_command(
        ["-c", "img", "--engine", "podman", "-i", str(series), "-m", "organ", "-o", str(tmp_path)]
    )
    assert command[:2] == ["podman", "run"]
    assert command[command.index("--device") + 1] == "nvidia.com/gpu=all"
    assert "--gpus" not in command and "--engine" not in command
