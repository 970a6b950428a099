"""deploy/kubernetes/listener.yaml: the DICOM listener on its own, as docs/hospital.md says:
`nnunet-bento listen` against the API Service, one pod at a time, its listener file from the
ConfigMap (a valid file), its DICOM port behind a Service of its own, the token from the
Secret. The schema check of every object is test_kubernetes.py's."""

from pathlib import Path

import yaml
from conftest import REPO
from test_kubernetes import API, by_kind, container_of, labels_match, pod_labels

from nnunet_bento.cli.main import build_parser
from nnunet_bento.pacs.listener_config import parse_listener_config

LISTENER = "nnunet-bento-listener"
API_SERVICE_URL = "http://nnunet-bento:3000"


def test_the_listener_runs_the_listen_command_against_the_api_service():
    container = container_of(by_kind("Deployment")[LISTENER])
    args = container["args"]
    assert args[:3] == ["python", "-m", "nnunet_bento.cli"]
    parsed = build_parser().parse_args(args[3:])
    assert (parsed.command, parsed.url, parsed.token) == ("listen", API_SERVICE_URL, None)
    assert container["workingDir"] == "/home/bentoml/bento/src"
    service = by_kind("Service")["nnunet-bento"]
    assert API_SERVICE_URL.endswith(f":{service['spec']['ports'][0]['port']}")
    env = {e["name"]: e for e in container["env"]}
    assert env["NNUNET_BENTO_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == (
        "nnunet-bento-api-token"
    )


def test_one_listener_pod_at_a_time():
    spec = by_kind("Deployment")[LISTENER]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"


def test_the_listener_file_comes_from_the_config_map_and_is_valid():
    deployment = by_kind("Deployment")[LISTENER]
    container = container_of(deployment)
    env = {e["name"]: e.get("value") for e in container["env"]}
    path = Path(env["NNUNET_BENTO_LISTENER"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(path.parent)]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_map = by_kind("ConfigMap")[volumes[mount["name"]]["configMap"]["name"]]
    config = parse_listener_config(yaml.safe_load(config_map["data"][path.name]), path.name)
    assert config.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dicom"] == config.port
    assert container["readinessProbe"]["tcpSocket"]["port"] == "dicom"
    work = Path(env["NNUNET_BENTO_WORK_DIR"])
    assert any(work.is_relative_to(mount_path) for mount_path in mounts)


def test_the_dicom_service_selects_the_listener_only():
    deployments = by_kind("Deployment")
    service = by_kind("Service")[LISTENER]
    selector = {"matchLabels": service["spec"]["selector"]}
    assert labels_match(selector, pod_labels(deployments[LISTENER]))
    assert not labels_match(selector, pod_labels(deployments[API]))
    assert [p["port"] for p in service["spec"]["ports"]] == [11112]


def test_the_listener_pod_runs_as_the_image_user_without_privileges():
    pod = by_kind("Deployment")[LISTENER]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    container = container_of(by_kind("Deployment")[LISTENER])
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_the_hospital_docs_name_the_manifest():
    assert "deploy/kubernetes/listener.yaml" in (REPO / "docs" / "hospital.md").read_text()
