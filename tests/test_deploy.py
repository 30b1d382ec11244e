"""Kubernetes manifests under deploy/: they parse, agree with the Dockerfile and server ports,
probe Triton's health endpoints, and autoscale on a queue metric a real tritonserver exports."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import urllib.request
from pathlib import Path

import yaml

from cellsam_triton.server import add_arguments, run

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
QUEUE_METRIC = "nv_inference_queue_duration_us"


def manifests() -> dict[str, dict]:
    """Every YAML document under deploy/, by kind (each kind once)."""
    docs: dict[str, dict] = {}
    files = sorted(DEPLOY.glob("*.yaml"))
    assert files, "no manifests in deploy/"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and "kind" in doc, f"{path.name}: not a Kubernetes object"
            assert doc["kind"] not in docs, f"{doc['kind']} defined twice"
            docs[doc["kind"]] = doc
    return docs


def test_ports_match_the_dockerfile_entrypoint_and_serve_defaults() -> None:
    docs = manifests()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1).split()}
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    serve = parser.parse_args(["--repository", "x"])
    block = re.search(r"serve_args=\((.+?)\)", entry, re.S).group(1).split()
    assert block[0] == "serve" and "--print-args" in block
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run(parser.parse_args([a.replace('"$repo"', "/models") for a in block[1:]])) == 0
    triton = printed.getvalue().split()
    for name, port in PORTS.items():
        assert f"--{name}-port={port}" in triton
        assert getattr(serve, f"{name}_port") == port
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared == PORTS and set(declared.values()) == exposed
    service = {p["name"]: p for p in docs["Service"]["spec"]["ports"]}
    assert {n: p["port"] for n, p in service.items()} == PORTS
    assert all(p["targetPort"] in declared for p in service.values())
    selector = docs["Service"]["spec"]["selector"]
    assert selector.items() <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_gpu_probes_shm_and_scraping() -> None:
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # Dockerfile HEALTHCHECK start-period
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert mounts["dshm"] == "/dev/shm" and shm["emptyDir"]["medium"] == "Memory"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(PORTS["metrics"])
    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["endpoints"][0]["port"] == "metrics" and monitor["endpoints"][0]["path"] == "/metrics"
    assert monitor["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def test_hpa_scales_the_deployment_on_the_adapter_queue_metric() -> None:
    docs = manifests()
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rules = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC) and rule["name"]["matches"] == QUEUE_METRIC
    assert QUEUE_METRIC in rule["metricsQuery"] and "nv_inference_request_success" in rule["metricsQuery"]
    assert float(metric["pods"]["target"]["averageValue"]) > 0


def test_the_queue_metrics_exist_on_a_real_tritonserver(tiny_server) -> None:
    with urllib.request.urlopen(f"http://{tiny_server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    for name in (QUEUE_METRIC, "nv_inference_request_success"):
        assert re.search(rf"^{name}\{{", text, re.M), f"{name} not exported by tritonserver"
