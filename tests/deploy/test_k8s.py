"""The Kubernetes overlays render, validate against the API schemas offline, and run real commands."""

from __future__ import annotations

import copy
import os
from unittest import mock

import kubernetes_validate
import pytest

from disagg.rpc import control_pb2 as pb
from launcher.cli import build_parser
from tests.deploy.manifests import (
    FIELD_VALUES,
    OVERLAYS,
    by_kind,
    container_env,
    expand_args,
    render,
    secret_values,
)

OVERLAY_NAMES = ["cpu", "gpu"]
WORKERS = {"disagg-prefill-worker": "prefill-worker", "disagg-decode-worker": "decode-worker"}
CONTROL_SERVICES = {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}


@pytest.fixture(scope="module", params=OVERLAY_NAMES)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def parsed(container: dict, objects: list[dict]):
    """The container's command line as `disagg` itself parses it, in the pod's environment
    (Secrets from `objects`, the rendered overlay)."""
    env = container_env(container, secret_values(objects))
    disagg_env = {k: v for k, v in env.items() if k.startswith("DISAGG_")}
    with mock.patch.dict(os.environ, disagg_env):
        return build_parser().parse_args(expand_args(container["args"], env))


def only_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    _, objects = overlay
    version = kubernetes_validate.latest_version()
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "PodDisruptionBudget"}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validation_is_strict_enough_to_catch_a_misspelt_field(overlay):
    deployment = copy.deepcopy(by_kind(overlay[1], "Deployment")["disagg-coordinator"])
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_worker_commands_parse_and_advertise_the_pod_ip(overlay):
    name, objects = overlay
    deployments = by_kind(objects, "Deployment")
    control_port = parsed(only_container(deployments["disagg-coordinator"]), objects).control_port
    services = by_kind(objects, "Service")
    for deployment_name, command in WORKERS.items():
        args = parsed(only_container(deployments[deployment_name]), objects)
        assert args.command == command
        assert args.advertise_host == FIELD_VALUES["status.podIP"]
        assert args.worker_id == FIELD_VALUES["metadata.name"]
        host, port = args.coordinator.split(":")
        control = services[host]
        assert control["spec"]["publishNotReadyAddresses"] is True, "workers register before ready"
        assert int(port) in [p["port"] for p in control["spec"]["ports"]]
        assert control_port in [p["port"] for p in control["spec"]["ports"]]
        assert args.device == ("cuda:0" if name == "gpu" else "cpu")
    decode = parsed(only_container(deployments["disagg-decode-worker"]), objects)
    assert decode.kv_transport == "tcp", "KV crosses pods, so it must go over TCP"


def test_coordinator_serves_the_contract_ports_and_is_scraped(overlay):
    deployments = by_kind(overlay[1], "Deployment")
    pod = deployments["disagg-coordinator"]["spec"]["template"]
    args = parsed(only_container(deployments["disagg-coordinator"]), overlay[1])
    assert args.command == "coordinator"
    assert (args.http_port, args.grpc_port, args.control_port) == (8000, 8001, 50050)
    ports = {
        p["name"]: p["containerPort"]
        for p in only_container(deployments["disagg-coordinator"])["ports"]
    }
    assert ports == {"http": 8000, "grpc": 8001, "control": 50050}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args.http_port
    assert annotations["prometheus.io/path"] == "/metrics"
    front = by_kind(overlay[1], "Service")["disagg"]
    assert {p["port"] for p in front["spec"]["ports"]} == {8000, 8001}
    assert front["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_every_pod_has_probes_and_resource_requests(overlay):
    for name, deployment in by_kind(overlay[1], "Deployment").items():
        container = only_container(deployment)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert probe in container, f"{name} has no {probe}"
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), name


def test_worker_probes_use_grpc_health_on_the_served_port(overlay):
    deployments = by_kind(overlay[1], "Deployment")
    for deployment_name in WORKERS:
        container = only_container(deployments[deployment_name])
        args = parsed(container, overlay[1])
        assert args.port in [p["containerPort"] for p in container["ports"]]
        readiness = container["readinessProbe"]["grpc"]
        assert readiness["port"] == args.port and "service" not in readiness
        for probe in ("livenessProbe", "startupProbe"):
            liveness = container[probe]["grpc"]
            assert liveness["port"] == args.port
            assert liveness["service"] in CONTROL_SERVICES


def test_gpu_overlay_gives_each_worker_one_gpu_and_cpu_overlay_none(overlay):
    name, objects = overlay
    for deployment_name, deployment in by_kind(objects, "Deployment").items():
        resources = only_container(deployment)["resources"]
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if name == "gpu" and deployment_name in WORKERS:
            assert gpus == 1 and resources["requests"]["nvidia.com/gpu"] == 1
        else:
            assert gpus is None, deployment_name


def test_each_worker_deployment_has_a_disruption_budget(overlay):
    objects = overlay[1]
    deployments = by_kind(objects, "Deployment")
    budgets = by_kind(objects, "PodDisruptionBudget").values()
    for deployment_name in WORKERS:
        labels = deployments[deployment_name]["spec"]["template"]["metadata"]["labels"]
        matching = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, deployment_name
        assert matching[0]["spec"]["maxUnavailable"] == 1


def cluster_secret_refs(deployment: dict) -> list[dict]:
    """Where the deployment's container takes DISAGG_CLUSTER_SECRET from."""
    env = only_container(deployment).get("env", [])
    return [v.get("valueFrom", v) for v in env if v["name"] == "DISAGG_CLUSTER_SECRET"]


def test_every_pod_takes_the_cluster_secret_from_the_secret(overlay):
    objects = overlay[1]
    secrets = secret_values(objects)
    deployments = by_kind(objects, "Deployment")
    assert deployments.keys() == {"disagg-coordinator", *WORKERS}
    values = set()
    for name, deployment in deployments.items():
        refs = cluster_secret_refs(deployment)
        assert [list(r) for r in refs] == [["secretKeyRef"]], f"{name} does not use the Secret"
        ref = refs[0]["secretKeyRef"]
        assert (ref["name"], ref["key"]) in secrets, f"{name} names a Secret not rendered: {ref}"
        assert "--cluster-secret" not in only_container(deployment)["args"], name
        values.add(parsed(only_container(deployment), objects).cluster_secret)
    assert len(values) == 1 and "" not in values, "one non-empty secret, the same in every pod"


def test_an_overlay_replaces_the_cluster_secret_in_every_pod(tmp_path):
    """The README's recipe: a secretGenerator with `behavior: replace` in your own overlay."""
    (tmp_path / "cluster-secret.env").write_text("cluster-secret=s3cr3t-from-the-overlay\n")
    base = os.path.relpath(OVERLAYS / "cpu", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{base}]\n"
        "secretGenerator:\n"
        "  - {name: disagg-cluster-secret, behavior: replace, envs: [cluster-secret.env]}\n"
    )
    objects = render(tmp_path)
    assert len(by_kind(objects, "Secret")) == 1, "the placeholder is replaced, not kept beside"
    for name, deployment in by_kind(objects, "Deployment").items():
        assert parsed(only_container(deployment), objects).cluster_secret == (
            "s3cr3t-from-the-overlay"
        ), name
