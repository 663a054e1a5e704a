"""The Kubernetes manifests (deploy/k8s) render with `kubectl kustomize` and hold, offline.

Both overlays (cpu, gpu), and the cpu overlay with the dicom-tls component and a site's
namePrefix, are rendered by `kubectl kustomize` (the only kubectl command used: no cluster is
needed). Every built-in object is validated against the Kubernetes JSON schemas that the
`kubernetes-validate` package ships (strict: unknown fields fail), for the oldest and newest
Kubernetes versions we name; KEDA's objects against tests/deploy/keda-v1alpha1.schema.json
(written from KEDA's CRDs, see its $comment). Then the invariants a reviewer would check by hand:
resources and probes, the GPU request, the DICOM port, settings that lusai knows and accepts, one
shared volume at the storage path, placeholder secrets, references that resolve.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, missing

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
#: Kubernetes versions the built-in objects must validate against (kubernetes-validate ships
#: 1.25 to 1.37): the oldest release the manifests claim, the kubectl used here, the newest shipped.
K8S_VERSIONS = ("1.28", "1.32", "1.37")
#: Secrets the manifests reference but never generate: the site makes them (docs/deployment.md).
SITE_SECRETS = {"lusai-api-tls", "lusai-dicom-tls", "lusai-dicom-client-ca"}
#: The one environment variable outside lusai's settings: the thread count of torch/onnxruntime.
OTHER_ENV = {"OMP_NUM_THREADS"}
KEDA_SCHEMA = Path(__file__).with_name("keda-v1alpha1.schema.json")

Doc = dict[str, Any]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing("kubectl (for `kubectl kustomize`)")
    assert kubectl is not None
    return kubectl


def _render_text(path: Path) -> str:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@functools.cache
def _rendered(path: Path) -> str:
    return _render_text(path)


def render(overlay: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(_rendered(K8S / "overlays" / overlay)) if d]


@pytest.fixture(scope="module")
def site_variant(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """A site's overlay on top of ours: cpu + DICOM TLS + a name prefix."""
    d = tmp_path_factory.mktemp("site")
    (d / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namePrefix": "site-",
                # relative: Kustomize takes no absolute path to a base or component
                "resources": [os.path.relpath(K8S / "overlays" / "cpu", d)],
                "components": [os.path.relpath(K8S / "components" / "dicom-tls", d)],
            }
        )
    )
    return [doc for doc in yaml.safe_load_all(_render_text(d)) if doc]


def variants(site: list[Doc]) -> Iterator[tuple[str, list[Doc]]]:
    for overlay in OVERLAYS:
        yield overlay, render(overlay)
    yield "cpu+dicom-tls+prefix", site


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith(name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> list[Doc]:
    return list(pod_spec(doc)["containers"])


def env_of(docs: list[Doc], container: Doc) -> dict[str, str]:
    """What the container's process sees as plain values: envFrom ConfigMaps and Secrets (in
    order), then env (valueFrom entries are left out)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(named(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
        if "secretRef" in src:
            data = named(docs, "Secret", src["secretRef"]["name"]).get("data", {})
            env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def settings_for(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """lusai's own Settings built from exactly ``env``, as the container would build them."""
    from service.core.settings import Settings

    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith("LUSAI_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return Settings()


# --- rendering ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_is_deterministic(overlay: str) -> None:
    first = _rendered(K8S / "overlays" / overlay)
    assert _render_text(K8S / "overlays" / overlay) == first
    kinds = sorted(d["kind"] for d in render(overlay))
    assert kinds == sorted(
        ["ConfigMap", "Secret", "Secret", "PersistentVolumeClaim", "Job", "Service", "Service", "Ingress"]
        + ["Deployment"] * 4
        + ["PodDisruptionBudget"] * 3
        + ["ScaledObject", "ScaledObject", "TriggerAuthentication"]
    )
    assert all("namespace" not in d["metadata"] for d in render(overlay))  # namespace-agnostic


# --- schemas ------------------------------------------------------------------------------


def test_the_schema_validator_refuses_a_misspelt_field() -> None:
    """Guards the test below: the schemas are found and strict (offline, from the package)."""
    import kubernetes_validate

    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_builtin_objects_validate_against_the_kubernetes_schemas(
    site_variant: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils

    # the package parses its 1.3 MB definitions file for every object: once per version is enough
    monkeypatch.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
    errors = []
    for variant, docs in variants(site_variant):
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = ".".join(str(p) for p in exc.path)
                    errors.append(
                        f"{variant} {doc['kind']}/{doc['metadata']['name']} @{version} {where}: {exc.message}"
                    )
    assert not errors, "\n".join(errors)


def test_keda_objects_validate_against_keda_crd_schema(site_variant: list[Doc]) -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    assert "KEDA" in schema["$comment"] and "2.17" in schema["$comment"]
    jsonschema.Draft202012Validator.check_schema(schema)
    validators = {
        kind: jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{kind}"})
        for kind in ("ScaledObject", "TriggerAuthentication")
    }
    seen = set()
    for _, docs in variants(site_variant):
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                validators[doc["kind"]].validate(doc)
                seen.add(doc["kind"])
    assert seen == set(validators)
    good = named(render("cpu"), "ScaledObject", "lusai-worker-analyze")
    for bad_spec in (
        {**good["spec"], "minReplicas": 1},  # misspelt
        {**good["spec"], "triggers": [{**good["spec"]["triggers"][0], "metadata": {"listLength": 10}}]},
    ):
        assert not validators["ScaledObject"].is_valid({**good, "spec": bad_spec})


# --- what each object promises -------------------------------------------------------------


def test_every_container_has_requests_limits_and_probes(site_variant: list[Doc]) -> None:
    for variant, docs in variants(site_variant):
        for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            for c in containers(doc):
                where = f"{variant} {doc['metadata']['name']}/{c['name']}"
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"].get(part, {})), where
                if doc["kind"] == "Deployment":
                    assert {"readinessProbe", "livenessProbe"} <= set(c), where


def test_probes_use_lusai_check_where_it_works() -> None:
    docs = render("cpu")
    for name in ("lusai-worker-analyze", "lusai-worker-deliver"):
        (c,) = containers(named(docs, "Deployment", name))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"] == ["lusai", "check", "worker"], (name, probe)
            assert c[probe]["periodSeconds"] >= 10 and c[probe]["timeoutSeconds"] >= 10  # ~2-3 s a run
        assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] >= 300
    (api,) = containers(named(docs, "Deployment", "lusai-api"))
    assert api["readinessProbe"]["httpGet"]["path"] == "/health"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    (scp,) = containers(named(docs, "Deployment", "lusai-scp"))
    assert scp["readinessProbe"]["exec"]["command"] == ["lusai", "check", "scp"]  # a real C-ECHO
    assert scp["readinessProbe"]["periodSeconds"] >= 30 and scp["readinessProbe"]["timeoutSeconds"] >= 10
    assert scp["livenessProbe"]["tcpSocket"]["port"] == "dicom"


def test_gpu_overlay_puts_analysis_on_one_gpu_per_pod() -> None:
    gpu, cpu = render("gpu"), render("cpu")
    analyze = named(gpu, "Deployment", "lusai-worker-analyze")
    (c,) = containers(analyze)
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"] == "lusai:gpu"  # the Dockerfile's gpu target, as docker-compose.yml names it
    assert env_of(gpu, c)["LUSAI_DEVICE"] == "cuda"
    assert pod_spec(analyze)["nodeSelector"] and pod_spec(analyze)["tolerations"]
    assert analyze["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU to surge onto
    for docs, device in ((gpu, "cuda"), (cpu, "cpu")):
        for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            name = doc["metadata"]["name"]
            gpu_worker = device == "cuda" and name == "lusai-worker-analyze"
            for c in containers(doc):
                assert c["image"] == ("lusai:gpu" if gpu_worker else "lusai:latest"), name
                assert gpu_worker or "nvidia.com/gpu" not in json.dumps(c["resources"]), name
                if name == "lusai-worker-analyze":
                    assert env_of(docs, c)["LUSAI_DEVICE"] == device
    assert "nvidia" not in _rendered(K8S / "overlays" / "cpu")


def test_scp_service_exposes_dicom_on_a_stable_address_keeping_the_caller() -> None:
    docs = render("gpu")
    svc = named(docs, "Service", "lusai-scp")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert [(p["port"], p["protocol"]) for p in svc["spec"]["ports"]] == [(11112, "TCP")]
    scp = named(docs, "Deployment", "lusai-scp")
    (c,) = containers(scp)
    port = {p["name"]: p for p in c["ports"]}[svc["spec"]["ports"][0]["targetPort"]]
    assert port["containerPort"] == int(env_of(docs, c)["LUSAI_DICOM_PORT"]) == 11112
    assert scp["spec"]["replicas"] >= 2


def test_every_env_var_is_a_lusai_setting(site_variant: list[Doc]) -> None:
    from service.core.settings import Settings

    known = {f"LUSAI_{n.upper()}" for n in Settings.model_fields}
    used: set[str] = set()
    for _, docs in variants(site_variant):
        for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            for c in containers(doc):
                used |= set(env_of(docs, c)) | {e["name"] for e in c.get("env", [])}
    for env_file in (K8S / "base").glob("*.env"):  # the commented examples too
        used |= set(re.findall(r"^#?(LUSAI_[A-Z0-9_]+)=", env_file.read_text(), flags=re.M))
    lusai = {n for n in used if n.startswith("LUSAI_")}
    assert lusai and lusai <= known, f"not lusai settings: {sorted(lusai - known)}"
    assert used - lusai <= OTHER_ENV, sorted(used - lusai - OTHER_ENV)


def test_lusai_accepts_each_containers_configuration(
    site_variant: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variant, docs in variants(site_variant):
        for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            for c in containers(doc):
                s = settings_for(env_of(docs, c), monkeypatch)  # raises on a value lusai refuses
                assert s.database_url.startswith("postgresql") and s.broker_url.startswith("redis://")
                assert s.allowed_calling_aes, (
                    f"{variant} {doc['metadata']['name']}: SCP open to loopback only"
                )
                if doc["metadata"]["name"].endswith("lusai-scp") and variant.endswith("prefix"):
                    assert s.dicom_tls_cert and s.dicom_tls_key and s.dicom_tls_ca


def test_one_shared_volume_holds_storage_and_spool(
    site_variant: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variant, docs in variants(site_variant):
        (pvc,) = of_kind(docs, "PersistentVolumeClaim")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert "storageClassName" not in pvc["spec"]  # the site's RWX class
        mounts = set()
        for doc in of_kind(docs, "Deployment"):
            pod = pod_spec(doc)
            (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
            assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
            (c,) = containers(doc)
            (mount,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == vol["name"]]
            mounts.add(mount)
            s = settings_for(env_of(docs, c), monkeypatch)
            for path in (s.storage, s.data_dir / "spool"):  # objects; the SCP's spool records
                assert Path(path).is_relative_to(mount), f"{variant} {doc['metadata']['name']}: {path}"
        assert len(mounts) == 1, f"{variant}: the volume is mounted at {mounts}"


def test_secrets_hold_placeholders_only(site_variant: list[Doc]) -> None:
    for _, docs in variants(site_variant):
        for secret in of_kind(docs, "Secret"):
            for key, raw in secret.get("data", {}).items():
                value = base64.b64decode(raw).decode()
                where = f"{secret['metadata']['name']}/{key}"
                if not value:
                    continue
                if "://" in value:
                    url = urlsplit(value)
                    assert url.password in (None, "CHANGE_ME") and url.username in (None, "", "lusai"), where
                    assert (url.hostname or "").endswith("example.org"), where
                elif "password" in key.lower():
                    assert value == "CHANGE_ME", where
                else:
                    assert value.split(":")[0].endswith("example.org"), where


def test_pdbs_select_existing_pods(site_variant: list[Doc]) -> None:
    for variant, docs in variants(site_variant):
        covered = set()
        for pdb in of_kind(docs, "PodDisruptionBudget"):
            want = pdb["spec"]["selector"]["matchLabels"]
            hits = [
                d["metadata"]["name"]
                for d in of_kind(docs, "Deployment")
                if want.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(hits) == 1, f"{variant} {pdb['metadata']['name']} selects {hits}"
            covered.add(hits[0].removeprefix("site-"))
        assert covered == {"lusai-scp", "lusai-api", "lusai-worker-analyze"}, variant


def test_references_resolve(site_variant: list[Doc]) -> None:
    from service.core.queue import QUEUES

    for variant, docs in variants(site_variant):
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
        for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            pod = pod_spec(doc)
            for c in pod["containers"]:
                for src in c.get("envFrom", []):
                    ref = src.get("configMapRef") or src["secretRef"]
                    kind = "ConfigMap" if "configMapRef" in src else "Secret"
                    assert (kind, ref["name"]) in names, f"{variant}: {ref['name']}"
            for v in pod.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
                if "secret" in v:
                    assert v["secret"]["secretName"] in SITE_SECRETS, v
        for svc in of_kind(docs, "Service"):
            sel = svc["spec"]["selector"].items()
            assert [
                n
                for n, d in deployments.items()
                if sel <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
        for ing in of_kind(docs, "Ingress"):
            for tls in ing["spec"]["tls"]:
                assert tls["secretName"] in SITE_SECRETS
            for rule in ing["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    svc = named(docs, "Service", backend["name"])
                    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
                    assert not path["path"].startswith(("/metrics", "/health"))  # stay in the cluster
        auths = {d["metadata"]["name"]: d for d in of_kind(docs, "TriggerAuthentication")}
        for auth in auths.values():
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["key"] in named(docs, "Secret", ref["name"])["data"], ref
            assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"address", "password"}
        for so in of_kind(docs, "ScaledObject"):
            target = deployments[so["spec"]["scaleTargetRef"]["name"]]
            assert "replicas" not in target["spec"], "KEDA owns the replicas"
            args = containers(target)[0]["args"]
            consumed = _consumed_queues(target)
            lists = set()
            for trigger in so["spec"]["triggers"]:
                assert trigger["type"] == "redis" and trigger["authenticationRef"]["name"] in auths
                meta = trigger["metadata"]
                assert meta["listName"] in QUEUES, meta
                assert meta["listName"] in consumed, (meta["listName"], consumed)  # its consumers scale
                assert int(meta["listLength"]) > 0 and int(meta["databaseIndex"]) == 0  # redis://.../0
                lists.add(meta["listName"])
            assert lists == consumed, (so["metadata"]["name"], lists, consumed)  # every backlog it serves
            assert args[args.index("--queues") + 1] in lists
        analyze = named(docs, "ScaledObject", "lusai-worker-analyze")
        assert analyze["spec"]["minReplicaCount"] == 1


def test_pods_run_as_the_images_user_on_a_read_only_root(site_variant: list[Doc]) -> None:
    found = re.search(r"useradd [^\n]*--uid (\d+)", (REPO / "Dockerfile").read_text())
    assert found, "the Dockerfile's user"
    uid = int(found.group(1))
    for variant, docs in variants(site_variant):
        for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            pod = pod_spec(doc)
            where = f"{variant} {doc['metadata']['name']}"
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] == uid, where
            assert pod["automountServiceAccountToken"] is False, where
            tmp = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert any(m["mountPath"] == "/tmp" and m["name"] in tmp for m in c["volumeMounts"]), where


def test_pods_outlive_lusai_shutdown_grace(site_variant: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    for _, docs in variants(site_variant):
        for doc in of_kind(docs, "Deployment"):
            (c,) = containers(doc)
            grace = settings_for(env_of(docs, c), monkeypatch).shutdown_grace
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["", "0"])
            pause = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0.0
            assert pod_spec(doc)["terminationGracePeriodSeconds"] > grace + pause + 10, doc["metadata"][
                "name"
            ]


def test_the_documented_first_apply_step_selects_config_storage_and_migration() -> None:
    """docs/deployment.md applies `-l 'app.kubernetes.io/component notin (...)'` first, then waits
    for the Job: that selector (which also matches objects without the label) must pick exactly
    what the Job needs, and no workload that would start before the migration."""
    text = (REPO / "docs" / "deployment.md").read_text()
    found = re.search(r"-l 'app\.kubernetes\.io/component notin \(([a-z,-]+)\)'", text)
    assert found, "the first apply step of docs/deployment.md"
    excluded = set(found.group(1).split(","))
    for overlay in OVERLAYS:
        picked = sorted(
            d["kind"]
            for d in render(overlay)
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in excluded
        )
        assert picked == sorted(
            ["ConfigMap", "Secret", "Secret", "PersistentVolumeClaim", "Job", "TriggerAuthentication"]
        ), overlay


def _consumed_queues(deployment: Doc) -> set[str]:
    """The Redis lists a worker Deployment consumes: its --queues, and with ``analyze`` the queue of
    its device (``LUSAI_DEVICE``, cpu when unset), as workers/celery_app.py adds it."""
    from service.core.queue import ANALYZE_QUEUE, device_queue

    container = containers(deployment)[0]
    args = container["args"]
    queues = set(args[args.index("--queues") + 1].split(","))
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if ANALYZE_QUEUE in queues:
        queues.add(device_queue(env.get("LUSAI_DEVICE") or "cpu"))
    return queues
