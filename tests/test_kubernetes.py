"""deploy/kubernetes: every object is valid against the Kubernetes schemas (offline, strict)
and holds what docs/container.md promises: two tiers started by serve_one, the runner on a
GPU behind a NetworkPolicy that admits only the API pods, probes, the token from a Secret,
the study and result volumes at the image's path roots."""

import pytest
import yaml
from conftest import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = REPO / "deploy" / "kubernetes"
#: the oldest and the newest Kubernetes minor version the schemas are checked against
VERSIONS = ("1.29.0", "1.37.0")
RUNNER_PORT = 3001
API_PORT = 3000


def objects() -> list[dict]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


RUNNER = "nnunet-bento-runner"
API = "nnunet-bento-api"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schema(version):
    found = objects()
    assert {o["kind"] for o in found} >= {
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PersistentVolumeClaim",
    }
    for obj in found:
        # strict: unknown fields (a typo such as `livenesProbe`) are errors too
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_catches_a_misspelt_field():
    deployment = by_kind("Deployment")[RUNNER]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    container_of(broken)["livenesProbe"] = container_of(broken).pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_deployment_selectors_match_their_pods_and_services():
    deployments = by_kind("Deployment")
    services = by_kind("Service")
    for deployment in deployments.values():
        assert labels_match(deployment["spec"]["selector"], pod_labels(deployment))
    assert labels_match(
        {"matchLabels": services[RUNNER]["spec"]["selector"]}, pod_labels(deployments[RUNNER])
    )
    assert not labels_match(
        {"matchLabels": services[RUNNER]["spec"]["selector"]}, pod_labels(deployments[API])
    )
    api_service = services["nnunet-bento"]
    assert labels_match(
        {"matchLabels": api_service["spec"]["selector"]}, pod_labels(deployments[API])
    )


def test_runner_runs_alone_on_a_gpu_behind_a_cluster_ip():
    deployment = by_kind("Deployment")[RUNNER]
    container = container_of(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    assert args[:4] == ["python", "-m", "nnunet_bento.server.serve_one", "ModelRunner"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == str(RUNNER_PORT)
    # the Bento folder of the image, whose models/ serve_one must use (docs/container.md)
    assert args[args.index("--bento") + 1] == "/home/bentoml/bento"
    assert container["workingDir"] == "/home/bentoml/bento/src"
    service = by_kind("Service")[RUNNER]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [RUNNER_PORT]
    # the runner needs no token, no volumes: it sees arrays, never paths
    assert "volumes" not in deployment["spec"]["template"]["spec"]


def test_api_is_replicated_and_wired_to_the_runner_service():
    deployment = by_kind("Deployment")[API]
    assert deployment["spec"]["replicas"] >= 2
    container = container_of(deployment)
    args = container["args"]
    assert args[:4] == ["python", "-m", "nnunet_bento.server.serve_one", "SegmentationService"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == str(API_PORT)
    assert args[args.index("--runner-url") + 1] == f"http://{RUNNER}:{RUNNER_PORT}"
    assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    service = by_kind("Service")["nnunet-bento"]
    assert [p["port"] for p in service["spec"]["ports"]] == [API_PORT]
    # a job is kept by the pod that accepted it: its client must come back to that pod
    assert service["spec"]["sessionAffinity"] == "ClientIP"


def test_network_policy_admits_only_api_pods_to_the_runner():
    (policy,) = by_kind("NetworkPolicy").values()
    deployments = by_kind("Deployment")
    spec = policy["spec"]
    assert labels_match(spec["podSelector"], pod_labels(deployments[RUNNER]))
    assert not labels_match(spec["podSelector"], pod_labels(deployments[API]))
    assert "Ingress" in spec["policyTypes"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector, no ipBlock
    assert labels_match(peer["podSelector"], pod_labels(deployments[API]))
    assert not labels_match(peer["podSelector"], pod_labels(deployments[RUNNER]))
    assert [p["port"] for p in rule["ports"]] == [RUNNER_PORT]
    # and the runner opens no connection of its own
    assert "Egress" in spec["policyTypes"] and spec["egress"] == []


@pytest.mark.parametrize("name", [RUNNER, API])
def test_probes_on_readyz_and_livez_at_the_served_port(name):
    container = container_of(by_kind("Deployment")[name])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    served = int(args[args.index("--port") + 1])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == served, probe


@pytest.mark.parametrize("name", [RUNNER, API])
def test_pods_run_as_the_image_user_without_privileges(name):
    pod = by_kind("Deployment")[name]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1034
    assert pod["automountServiceAccountToken"] is False
    container = container_of(by_kind("Deployment")[name])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_api_token_comes_from_a_secret():
    env = {e["name"]: e for e in container_of(by_kind("Deployment")[API])["env"]}
    token = env["NNUNET_BENTO_API_TOKEN"]
    assert "value" not in token
    assert token["valueFrom"]["secretKeyRef"] == {"name": "nnunet-bento-api-token", "key": "token"}
    # no Secret with a value is shipped: a default token would be a known token
    assert not by_kind("Secret")


def test_api_mounts_studies_read_only_and_results_at_the_path_roots():
    deployment = by_kind("Deployment")[API]
    container = container_of(deployment)
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert env["NNUNET_BENTO_INPUT_ROOTS"] == "/data/in"
    assert env["NNUNET_BENTO_OUTPUT_ROOT"] == "/data/out"
    assert mounts["/data/in"]["readOnly"] is True
    assert not mounts["/data/out"].get("readOnly", False)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claims = by_kind("PersistentVolumeClaim")
    for mount in mounts.values():
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims
    studies = volumes[mounts["/data/in"]["name"]]["persistentVolumeClaim"]
    assert studies["readOnly"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 1034


def test_manifest_files_are_where_the_docs_say():
    docs = (REPO / "docs" / "container.md").read_text()
    for path in DEPLOY.glob("*.yaml"):
        assert path.name in docs, f"docs/container.md does not mention {path.name}"
