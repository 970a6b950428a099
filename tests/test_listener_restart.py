"""A server restarted between two associations of one series: the series settles whole after
the restart and makes one job; no job ever runs on half of it."""

import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, bentoml_serve, free_port
from test_hospital import CT, MODALITY_AE, ORGAN_REQUEST, OUR_AE, Hospital, wait_for

pytestmark = pytest.mark.slow

#: Longer than a server takes to stop, so the first half cannot settle before the restart.
SETTLE_S = 20


def test_a_series_sent_across_a_restart_settles_whole_in_one_job(imported_models, tmp_path):
    port = free_port()
    listener = {
        "ae_title": OUR_AE,
        "port": port,
        "host": "127.0.0.1",
        "allowed_calling_ae": [MODALITY_AE],
        "settle_s": SETTLE_S,
        "routes": [{"name": "ct-organ", "match": {"Modality": "CT"}, "request": ORGAN_REQUEST}],
    }
    (tmp_path / "listener.yaml").write_text(yaml.safe_dump(listener))
    shutil.copy(REPO / "model-serve-spec.yaml", tmp_path / "spec.yaml")
    env = {
        "NNUNET_BENTO_LISTENER": str(tmp_path / "listener.yaml"),
        "NNUNET_BENTO_OUTPUT_ROOT": str(tmp_path / "out"),
        "NNUNET_BENTO_WORK_DIR": str(tmp_path / "work"),
    }
    files = sorted(CT.glob("*.dcm"))
    halves = files[: len(files) // 2], files[len(files) // 2 :]

    def served(log: str):
        return bentoml_serve(tmp_path / "spec.yaml", tmp_path / log, env=env)

    with served("first.log") as server:
        server.client.model_info()
        first = Hospital(server.url, port, tmp_path)
        wait_for(first.echo, "an answer to C-ECHO")
        first.store(list(halves[0]))
        assert first.listener_jobs() == {}
    with served("second.log") as server:
        server.client.model_info()
        second = Hospital(server.url, port, tmp_path)
        wait_for(second.echo, "an answer to C-ECHO after the restart")
        assert second.listener_jobs() == {}, "no job ran on the first half"
        second.store(list(halves[1]))
        job = second.new_job({})
        (prediction,) = Path(tmp_path / "out").rglob("stage_0/prediction.nii.gz")
        assert sitk.ReadImage(str(prediction)).GetSize()[2] == len(files), "the whole series"
        assert list(second.listener_jobs()) == [job["job_id"]]
