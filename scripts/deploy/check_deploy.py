"""Render every Kustomize overlay under deploy/k8s/overlays and check it offline.

1. Schemas: built-in kinds against the Kubernetes OpenAPI schemas
   (kubernetes-validate, strict: unknown fields are errors) for the oldest and
   newest versions in KUBERNETES_VERSIONS; KEDA and Prometheus Operator kinds
   against their CRD models (cloudcoil), with unknown fields refused too. A kind
   with no schema is an error, not a skip.
2. What the code needs of a deployment: every work queue of the code
   (shared/src/domain/task.rs) is served by one worker pool and scaled by a
   KEDA trigger on that pool, named with the rendered queue namespace; every
   Deployment has a PodDisruptionBudget, a readiness probe on /readyz and is
   scraped by the PodMonitor; the GPU overlay puts the model workers on GPU
   nodes with the CUDA image; deploy/Dockerfile pins the same onnxruntime-gpu
   wheel as models/manifest.toml.

Run through scripts/check-deploy, which provides the tools.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
ROLES = {"api", "scheduler", "worker", "serve"}

problems: list[str] = []


def problem(where: str, what: str) -> None:
    problems.append(f"{where}: {what}")


def render(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        problem("scripts/check-deploy", "no kubectl on PATH")
        return []
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        problem(str(directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory),
                f"kubectl kustomize failed: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- schemas ---------------------------------------------------------------

def crd_models() -> dict[tuple[str, str], type]:
    import cloudcoil.models.keda.v1alpha1 as keda
    import cloudcoil.models.prometheus_operator.v1 as monitoring

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
        ("monitoring.coreos.com/v1", "PodMonitor"): monitoring.PodMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
    }


def unknown_keys(given, kept, path: str) -> list[str]:
    """Keys of `given` that the model dropped (pydantic ignores extra fields)."""
    found: list[str] = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                found.append(f"{path}.{key}")
            else:
                found += unknown_keys(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            found += unknown_keys(a, b, f"{path}[{i}]")
    return found


def check_schema(where: str, doc: dict, models: dict) -> None:
    import kubernetes_validate as kv

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in models:
        try:
            model = models[key].model_validate(doc)
        except Exception as e:  # pydantic.ValidationError
            problem(where, f"{name_of(doc)} does not match its CRD: {e}")
            return
        kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        for field in unknown_keys(doc, kept, ""):
            problem(where, f"{name_of(doc)}: unknown field {field.lstrip('.')}")
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            problem(where, f"{name_of(doc)}: no schema for {key[0]} {key[1]} in Kubernetes {version}")
            return
        except kv.ValidationError as e:
            problem(where, f"{name_of(doc)} invalid for Kubernetes {version}: "
                           f"{'.'.join(str(p) for p in e.path)}: {e.message}")
            return


# --- what the code needs ---------------------------------------------------

def work_queues() -> list[str]:
    source = (ROOT / "shared/src/domain/task.rs").read_text()
    body = source[source.index("pub fn as_str(self)"):]
    body = body[: body.index("\n    }\n")]
    queues = re.findall(r'WorkQueue::\w+ => "([a-z_]+)"', body)
    if len(queues) < 5:
        problem("shared/src/domain/task.rs", f"could not read WorkQueue::as_str (found {queues})")
    return queues


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def atelier_containers(deployment: dict) -> list[dict]:
    return [
        c for c in deployment["spec"]["template"]["spec"]["containers"]
        if (c.get("args") or [""])[0] in ROLES
    ]


def selects(selector: dict, labels: dict) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    return True


def check_overlay(where: str, docs: list[dict], queues: list[str]) -> None:
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    config = next((c for c in by_kind.get("ConfigMap", [])
                   if c["metadata"]["name"] == "atelier-config"), None)
    if config is None:
        problem(where, "no ConfigMap atelier-config")
        return
    namespace = (config.get("data") or {}).get("ATELIER_QUEUE__NAMESPACE", "")
    if namespace and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", namespace):
        problem(where, f"ATELIER_QUEUE__NAMESPACE {namespace!r} is not a valid queue namespace")

    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    pdbs = by_kind.get("PodDisruptionBudget", [])
    monitors = by_kind.get("PodMonitor", [])
    served: dict[str, str] = {}
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not any(selects(p["spec"]["selector"], labels) for p in pdbs):
            problem(where, f"Deployment {name} has no PodDisruptionBudget")
        if monitors and not any(selects(m["spec"]["selector"], labels) for m in monitors):
            problem(where, f"Deployment {name} is not scraped by the PodMonitor")
        for c in atelier_containers(d):
            probe = (c.get("readinessProbe") or {}).get("httpGet") or {}
            if probe.get("path") != "/readyz" or probe.get("port") != "admin":
                problem(where, f"Deployment {name}: readiness probe is not /readyz on the admin port")
            if c["args"][0] != "worker":
                continue
            value = env_of(c).get("ATELIER_WORKER__QUEUES")
            if not value:
                problem(where, f"Deployment {name}: a worker pool names its queues (ATELIER_WORKER__QUEUES)")
                continue
            for q in value.split(","):
                if q not in queues:
                    problem(where, f"Deployment {name} serves {q!r}, which is not a work queue")
                elif q in served:
                    problem(where, f"queue {q} is served by both {served[q]} and {name}")
                else:
                    served[q] = name
    for q in queues:
        if q not in served:
            problem(where, f"no worker pool serves the work queue {q}")

    scalers = by_kind.get("ScaledObject", [])
    if not scalers:
        return
    scaled: dict[str, set[str]] = {}
    for s in scalers:
        target = s["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            problem(where, f"ScaledObject {s['metadata']['name']} scales a missing Deployment {target}")
        for t in s["spec"]["triggers"]:
            meta = t.get("metadata", {})
            if t["type"] == "rabbitmq":
                queue = meta.get("queueName", "")
                if not queue.startswith(namespace) or queue[len(namespace):] not in queues:
                    problem(where, f"ScaledObject {s['metadata']['name']}: queueName {queue!r} is not "
                                   f"a work queue in the namespace {namespace!r}")
                    continue
                scaled.setdefault(target, set()).add(queue[len(namespace):])
            elif t["type"] == "prometheus":
                for q in re.findall(r'queue="([a-z_]+)"', meta.get("query", "")):
                    scaled.setdefault(target, set()).add(q)
    for q, pool in served.items():
        if q not in scaled.get(pool, set()):
            problem(where, f"Deployment {pool} serves {q} but no KEDA trigger on it watches {q}")
        for other, qs in scaled.items():
            if other != pool and q in qs:
                problem(where, f"{other} is scaled on {q}, which {pool} serves")


def check_gpu(where: str, docs: list[dict]) -> None:
    worker = next((d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "atelier-worker"), None)
    if worker is None:
        problem(where, "no atelier-worker Deployment")
        return
    spec = worker["spec"]["template"]["spec"]
    c = atelier_containers(worker)[0]
    env = env_of(c)
    limits = (c.get("resources") or {}).get("limits") or {}
    if str(limits.get("nvidia.com/gpu")) != "1":
        problem(where, "atelier-worker does not ask for one nvidia.com/gpu")
    if not spec.get("nodeSelector") or not any(
            t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
        problem(where, "atelier-worker has no GPU node selector and toleration")
    if env.get("ATELIER_WORKER__DEVICE") != "cuda":
        problem(where, "atelier-worker does not set ATELIER_WORKER__DEVICE=cuda")
    if not env.get("ORT_DYLIB_PATH", "").startswith("/opt/onnxruntime/"):
        problem(where, "atelier-worker does not load the CUDA image's ONNX Runtime (/opt/onnxruntime)")
    if not c["image"].endswith("-cuda"):
        problem(where, f"atelier-worker image {c['image']} is not the CUDA image")


def check_dockerfile() -> None:
    manifest = tomllib.loads((ROOT / "models/manifest.toml").read_text())
    entry = next(m for m in manifest["model"] if m["name"] == "onnxruntime-gpu")
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    for arg, want in [("ORT_GPU_VERSION", entry["source"]["version"]),
                      ("ORT_GPU_SHA256", entry["source"]["sha256"])]:
        got = re.search(rf"^ARG {arg}=(\S+)$", dockerfile, re.M)
        if not got or got.group(1) != want:
            problem("deploy/Dockerfile", f"{arg} is {got and got.group(1)}, models/manifest.toml has {want}")


def main() -> int:
    models = crd_models()
    queues = work_queues()
    overlays = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    if not overlays:
        problem("deploy/k8s/overlays", "no overlays")
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        # An operator's overlay on a shared broker: the gpu overlay plus the
        # queue-namespace component, as components/queue-namespace explains.
        namespaced = Path(tmp) / "namespaced"
        namespaced.mkdir()
        (namespaced / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [os.path.relpath(K8S / "overlays/gpu", namespaced), "queue-namespace.yaml"],
            "components": [os.path.relpath(K8S / "components/queue-namespace", namespaced)],
        }))
        (namespaced / "queue-namespace.yaml").write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "atelier-queue-namespace",
                         "annotations": {"config.kubernetes.io/local-config": "true"}},
            "data": {"name": "eu.prod"},
        }))
        for directory in overlays + [namespaced]:
            where = (str(directory.relative_to(ROOT)) if directory.is_relative_to(ROOT)
                     else "gpu overlay + components/queue-namespace")
            docs = render(directory)
            if not docs:
                continue
            for doc in docs:
                check_schema(where, doc, models)
            check_overlay(where, docs, queues)
            if directory.name in ("gpu", "namespaced"):
                check_gpu(where, docs)
            if directory == namespaced:
                config = next((d for d in docs if d["kind"] == "ConfigMap"
                               and d["metadata"]["name"] == "atelier-config"), {})
                if config.get("data", {}).get("ATELIER_QUEUE__NAMESPACE") != "eu.prod.":
                    problem(where, "the component did not set ATELIER_QUEUE__NAMESPACE=eu.prod.")
            counts.append(f"{where}: {len(docs)} manifests")
    # Applied by hand, outside the overlays.
    for extra in ["base/migrate-job.yaml", "base/secret.example.yaml"]:
        for doc in yaml.safe_load_all((K8S / extra).read_text()):
            if doc:
                check_schema(f"deploy/k8s/{extra}", doc, models)
    check_dockerfile()
    for line in counts:
        print(f"[check-deploy] {line}")
    if problems:
        for p in problems:
            print(f"[check-deploy] FAIL {p}", file=sys.stderr)
        return 1
    print(f"[check-deploy] ok: schemas of Kubernetes {', '.join(KUBERNETES_VERSIONS)}, "
          f"KEDA and Prometheus Operator; queues {', '.join(queues)} served and scaled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
