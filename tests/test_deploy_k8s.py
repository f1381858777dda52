"""deploy/k8s: rendered with `kubectl kustomize`, every object validated against the Kubernetes
schemas (kubernetes-validate, strict: an unknown field fails), KEDA's against the fields we use,
and the manifests checked against the code: the gateway's settings load, probes and drain times
match the gateway's, Services select real pods, and vLLM runs with start_vllm_models.sh's flags."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT
from test_scripts import env_for, fake_nvidia_smi, record, run

from er_gateway.settings import load_settings

K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.30.0"
KUSTOMIZATIONS = ("base", "overlays/gpu")


def render(where: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing; scripts/test.sh installs it (Debian's kubernetes-client)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / where)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# KEDA's ScaledObject is a custom resource: not in the Kubernetes schemas. These are the fields
# keda.sh/v1alpha1 documents, for the parts the manifests use; anything else is refused.
_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "additionalProperties": False,
    "properties": {
        "type": {"enum": ["prometheus", "cpu", "memory"]},
        "metricType": {"enum": ["Utilization", "AverageValue", "Value"]},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}},
                        }
                    },
                },
                "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
            },
        },
    },
}


@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_every_object_is_valid(where: str) -> None:
    docs = render(where)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "StatefulSet", "ConfigMap"} <= kinds
    for d in docs:
        if d["kind"] == "ScaledObject":
            jsonschema.validate(d, SCALED_OBJECT)
            for t in d["spec"]["triggers"]:
                if t["type"] == "prometheus":
                    assert {"serverAddress", "query", "threshold"} <= set(t["metadata"]), t
        else:
            kubernetes_validate.validate(d, KUBERNETES, strict=True)
    # the validation is strict: a misspelt field is caught
    bad = copy.deepcopy(by_kind(docs, "Deployment")["er-gateway"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_the_gateway_runs_as_the_code_expects(where: str) -> None:
    docs = render(where)
    gw = by_kind(docs, "Deployment")["er-gateway"]
    pod = gw["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = by_kind(docs, "ConfigMap")[container["envFrom"][0]["configMapRef"]["name"]]["data"]
    secrets = {e["name"]: "secret" for e in container["env"] if "valueFrom" in e}
    # $(VAR) in a value is Kubernetes' expansion of a variable defined before it
    values = {e["name"]: e["value"].replace("$(REDIS_PASSWORD)", secrets["REDIS_PASSWORD"])
              for e in container["env"] if "value" in e}  # fmt: skip
    settings = load_settings({}, environ={**config, **secrets, **values})  # the gateway's own validation
    assert settings.redis_url == "redis://:secret@redis:6379/0"
    assert settings.keys_store == "redis" and settings.workers == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["ports"][0]["containerPort"] == settings.port
    # Kubernetes must not SIGKILL a pod before it has drained
    assert pod["terminationGracePeriodSeconds"] > settings.drain_delay + settings.drain_timeout
    assert container["readinessProbe"]["timeoutSeconds"] >= 2 and container["readinessProbe"]["failureThreshold"] >= 2
    # the keys import runs the `keys` CLI on the same settings
    (init,) = pod["initContainers"]
    assert init["envFrom"] == container["envFrom"] and "keys import" in " ".join(init["args"])
    assert [e for e in init["env"] if e["name"] in ("REDIS_PASSWORD", "ER_REDIS_URL")] == [
        e for e in container["env"] if e["name"] in ("REDIS_PASSWORD", "ER_REDIS_URL")
    ]
    # the "restricted" Pod Security level
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    for c in (container, init):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
    # every backend URL is a headless Service of a vLLM Deployment, on the port it serves
    services = by_kind(docs, "Service")
    deployments = by_kind(docs, "Deployment")
    for model in settings.models:
        ((host, port),) = [u.removeprefix("http://").split(":") for u in model.urls]
        svc = services[host]
        assert svc["spec"]["clusterIP"] == "None", host  # one replica per pod (DNS discovery)
        assert [p["port"] for p in svc["spec"]["ports"]] == [int(port)]
        assert (
            f"--served-model-name={model.name}"
            in deployments[host]["spec"]["template"]["spec"]["containers"][0]["args"]
        )
    assert "redis" in services
    redis_args = by_kind(docs, "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--requirepass" in redis_args and "volatile-lru" in redis_args
    # each Service and the disruption budget select the pods of one workload
    pods = {
        n: d["spec"]["template"]["metadata"]["labels"]
        for n, d in {**deployments, **by_kind(docs, "StatefulSet")}.items()
    }
    for name, svc in services.items():
        sel = svc["spec"]["selector"]
        assert [n for n, labels in pods.items() if sel.items() <= labels.items()] == [name], name
    # only the gateway's pods may reach Redis and vLLM
    policies = by_kind(docs, "NetworkPolicy")
    guarded = set()
    for pol in policies.values():
        sel = pol["spec"]["podSelector"]
        for name, labels in pods.items():
            exprs = sel.get("matchExpressions", [])
            if sel.get("matchLabels", {}).items() <= labels.items() and all(
                labels.get(e["key"]) in e["values"] for e in exprs
            ):
                guarded.add(name)
        sources = [
            f["podSelector"]["matchLabels"] for r in pol["spec"]["ingress"] for f in r["from"] if "podSelector" in f
        ]
        assert sources == [{"app.kubernetes.io/name": "er-gateway"}], pol["metadata"]["name"]
    assert guarded == {"redis", "vllm-embedding", "vllm-reranker"}
    pdb = by_kind(docs, "PodDisruptionBudget")["er-gateway"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pods["er-gateway"].items()
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["er-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "er-gateway"


def test_gpu_overlay_scales_on_the_gateway_queue() -> None:
    docs = render("overlays/gpu")
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {"er-gateway", "vllm-embedding", "vllm-reranker"}
    for name, so in scaled.items():
        assert so["spec"]["scaleTargetRef"]["name"] in by_kind(docs, "Deployment")
        queries = [t["metadata"]["query"] for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
        assert any("er_queued_requests" in q for q in queries), name
    # the gateway's takes over the base's CPU HPA (KEDA refuses two autoscalers on one Deployment)
    gw = scaled["er-gateway"]
    assert gw["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
    assert gw["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"] == "er-gateway"
    for name in ("vllm-embedding", "vllm-reranker"):
        c = by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        model = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--served-model-name="))
        queries = [t["metadata"]["query"] for t in scaled[name]["spec"]["triggers"]]
        assert f'vllm:num_requests_waiting{{model_name="{model}"}}' in " ".join(queries)  # its own queue


def _flags(args: list[str]) -> dict[str, str]:
    """`[model, --a=1, --b, 2]` as {"model": model, "--a": "1", "--b": "2"}."""
    out = {"model": args[0]}
    i = 1
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if not eq:
            value = args[i + 1]
            i += 1
        out[flag] = value
        i += 1
    return out


def test_vllm_runs_with_the_start_scripts_flags(tmp_path: Path) -> None:
    """The manifests' vLLM arguments equal what start_vllm_models.sh runs on a 2-GPU host (but for
    the address: every pod listens on 0.0.0.0:8000)."""
    env = env_for(tmp_path, DEVICE="auto", PATH=fake_nvidia_smi(tmp_path, 2))
    try:
        r = run("start_vllm_models.sh", env)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = record(env)
    finally:
        run("stop_vllm_models.sh", env)
    started = {}
    for line in lines:
        flags = _flags(line.removeprefix("ARGS ").split(" ENV ")[0].split())
        started["vllm-embedding" if "--convert" in flags else "vllm-reranker"] = flags
    deployments = by_kind(render("overlays/gpu"), "Deployment")
    for name, script in started.items():
        manifest = _flags(deployments[name]["spec"]["template"]["spec"]["containers"][0]["args"])
        assert manifest.pop("--host") == "0.0.0.0" and manifest.pop("--port") == "8000"
        script.pop("--host")
        script.pop("--port")
        assert manifest == script, name
