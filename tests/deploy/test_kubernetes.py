"""deploy/kubernetes: valid against a pinned Kubernetes schema (strict), and wired the way the node needs.

The schemas are those shipped inside the kubernetes-validate package (no network). What is checked
besides the schema: the GPU worker's limits, node selector and tolerations; two receivers with a
rolling update; no secret in plain values (the Secrets referenced = the ones the README creates);
the securityContext hardening; probes on real paths and ports; the ConfigMap's TOML under the node's
own loader (object store and credential files included); the multi-host topology (no shared
writable volume: each pod's data folder is its own emptyDir). Not checked here: a real cluster
(scheduling, the storage class, the NVIDIA device plugin, the object store, the image at run time).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.tools import DEPLOY, REPO, need_module

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

K8S = DEPLOY / "kubernetes"
# The oldest Kubernetes minor release the manifests must be valid for (kubernetes-validate ships
# the schemas of 1.25 to 1.37 in its 1.37 release).
KUBERNETES_VERSION = "1.35.0"
UID = 10001  # deploy/Dockerfile: USER 10001:10001
CONFIG_PATH = "/etc/ctp-node/ctp-node.toml"
DB_ENV = "CTP_NODE_JOBS__DATABASE_URL"
DATA_DIR = "/var/lib/ctp-node"
S3_SECRET = "ctp-node-s3"  # the object store's key pair, created by the operator (README)
# A URL holding credentials (scheme://user:password@host), or a password-ish variable with a value.
CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|DATABASE_URL|_KEY$", re.IGNORECASE)


def _kv():
    return need_module("kubernetes_validate", ".venv/bin/pip install 'kubernetes-validate>=1.35,<2'")


def _yaml():
    return need_module("yaml", ".venv/bin/pip install pyyaml")


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[dict]:
    return [doc for doc in _yaml().safe_load_all(path.read_text()) if doc is not None]


def _validate(doc: dict) -> None:
    kv = _kv()
    kv.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [doc for path in _manifest_files() for doc in _load(path)]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def receiver(docs) -> dict:
    return _one(docs, "Deployment", "ctp-node-receiver")


@pytest.fixture(scope="module")
def worker(docs) -> dict:
    return _one(docs, "Deployment", "ctp-node-worker")


@pytest.fixture(scope="module")
def toml_text(docs) -> str:
    return _one(docs, "ConfigMap", "ctp-node-config")["data"]["ctp-node.toml"]


@pytest.fixture(scope="module")
def toml(toml_text) -> dict:
    return tomllib.loads(toml_text)


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _container(deployment: dict) -> dict:
    (container,) = _pod(deployment)["containers"]
    return container


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _mounts(deployment: dict) -> dict[str, dict]:
    """Mount path -> the pod volume mounted there."""
    volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in _container(deployment)["volumeMounts"]}


# --- the schema -----------------------------------------------------------------------------------


def test_every_manifest_matches_the_pinned_kubernetes_schema(docs):
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    for doc in docs:
        _validate(doc)  # strict: an unknown field anywhere fails
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "ctp-node"


def test_validation_rejects_a_broken_manifest(tmp_path):
    kv = _kv()
    source = K8S / "worker.yaml"
    (original,) = _load(source)
    # An unknown field (a typo'd key in a container), written to a file and read back like the others.
    broken = copy.deepcopy(original)
    _container(broken)["resource"] = {"limits": {"nvidia.com/gpu": 1}}
    copy_path = tmp_path / "worker.yaml"
    copy_path.write_text(_yaml().safe_dump(broken))
    with pytest.raises(kv.ValidationError, match="resource"):
        for doc in _load(copy_path):
            _validate(doc)
    # A wrong type.
    wrong_type = copy.deepcopy(original)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        _validate(wrong_type)
    # A missing required field (a container without its name).
    unnamed = copy.deepcopy(original)
    del _container(unnamed)["name"]
    with pytest.raises(kv.ValidationError):
        _validate(unnamed)
    _validate(original)  # the untouched one still passes


def test_kustomization_names_every_manifest():
    kustomization = _yaml().safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "ctp-node"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifest_files())


def test_kustomize_output_matches_the_schema():
    # Optional (.ci/run does not install kubectl): skipped without it even under
    # CTP_NODE_DEPLOY_CHECKS=required; the documents themselves are validated above either way.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (`kubectl kustomize` renders deploy/kubernetes offline)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    out = [d for d in _yaml().safe_load_all(rendered) if d is not None]
    assert len(out) == sum(len(_load(p)) for p in _manifest_files())
    for doc in out:
        _validate(doc)


# --- what the node needs --------------------------------------------------------------------------


def test_image_is_the_one_compose_builds(docs):
    compose = (DEPLOY / "compose.yaml").read_text()
    image = re.search(r"image: \$\{CTP_NODE_IMAGE:-([^}]+)\}", compose).group(1)
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        assert _container(deployment)["image"] == image
    name, _, tag = image.partition(":")
    kustomization = _yaml().safe_load((K8S / "kustomization.yaml").read_text())
    assert {"name": name, "newTag": tag} in kustomization["images"]


def test_worker_gets_one_gpu_on_a_gpu_node(worker, toml):
    pod, container = _pod(worker), _container(worker)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1  # extended resources: requests == limits
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    args = container["args"]
    assert args[:3] == ["worker", "--device", "cuda:0"]  # the pod sees its one GPU as cuda:0
    assert int(args[args.index("--metrics-port") + 1]) == _ports(container)["metrics"]
    # Long enough to finish the series in hand: as the systemd unit's TimeoutStopSec=15min.
    unit = (DEPLOY / "systemd" / "ctp-node-worker@.service").read_text()
    minutes = int(re.search(r"^TimeoutStopSec=(\d+)min$", unit, re.MULTILINE).group(1))
    assert pod["terminationGracePeriodSeconds"] >= minutes * 60
    assert "readinessProbe" not in container and "livenessProbe" not in container  # no health endpoint
    mounts = _mounts(worker)
    checkpoint = Path(toml["model"]["checkpoint"])
    weights = next(path for path in mounts if checkpoint.is_relative_to(path) and path != "/")
    assert mounts[weights]["persistentVolumeClaim"]["claimName"] == "ctp-node-weights"
    assert next(m for m in container["volumeMounts"] if m["mountPath"] == weights)["readOnly"] is True


def test_receiver_serves_dicom_status_and_metrics(docs, receiver, toml):
    container = _container(receiver)
    assert container["args"][0] == "serve"
    ports = _ports(container)
    assert ports["dicom"] == toml["dicom"]["port"]
    assert ports["metrics"] == toml["metrics"]["port"]
    assert ports["status"] == toml["web"]["port"]
    assert toml["dicom"]["bind_address"] == toml["metrics"]["bind_address"] == toml["web"]["bind_address"] == "0.0.0.0"
    labels = receiver["spec"]["template"]["metadata"]["labels"]
    for name, port in (("ctp-node-dicom", "dicom"), ("ctp-node-status", "status"), ("ctp-node-metrics", "metrics")):
        service = _one(docs, "Service", name)
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["selector"].items() <= labels.items()
        (entry,) = service["spec"]["ports"]
        assert entry["targetPort"] == port and entry["port"] == ports[port]
    # Headless: Prometheus scrapes every receiver pod and every worker pod, not one at random.
    for name in ("ctp-node-metrics", "ctp-node-worker-metrics"):
        assert _one(docs, "Service", name)["spec"]["clusterIP"] == "None", name
    # Two receivers behind the one DICOM Service (series completion is per SeriesInstanceUID in the
    # database), replaced one at a time with the new pod ready first, so one always serves.
    assert receiver["spec"]["replicas"] == 2
    assert receiver["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert _pod(receiver)["terminationGracePeriodSeconds"] >= 30
    budget = _one(docs, "PodDisruptionBudget", "ctp-node-receiver")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"] == receiver["spec"]["selector"]["matchLabels"]
    spread = _pod(receiver)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_probes_point_at_real_endpoints(receiver, worker, toml):
    container = _container(receiver)
    ports = _ports(container)
    ready = container["readinessProbe"]["httpGet"]
    # The status page's unauthenticated health route, served where [web] says.
    app = (REPO / "ctp_node" / "web" / "app.py").read_text()
    assert f'@app.get("{ready["path"]}"' in app and ready["path"] == "/healthz"
    assert toml["web"]["enabled"] is True
    assert ports[ready["port"]] == toml["web"]["port"]
    # Liveness: the image's health check (a C-ECHO with the node's own AE title from 127.0.0.1).
    (command,) = container["livenessProbe"]["exec"]["command"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = re.search(r"^COPY .*deploy/bin/ctp-node-healthcheck.* (/\S+/)$", dockerfile, re.MULTILINE)
    assert copied and command == copied.group(1) + "ctp-node-healthcheck"
    assert (DEPLOY / "bin" / "ctp-node-healthcheck").is_file()
    callers = toml["dicom"].get("allowed_callers", [])
    assert not callers or {"ae_title": toml["dicom"]["ae_title"], "host": "127.0.0.1"} in callers
    assert container["livenessProbe"]["timeoutSeconds"] >= 15  # two Python starts and an association
    for deployment in (receiver, worker):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            http = _container(deployment).get(probe, {}).get("httpGet")
            assert http is None or http["port"] in _ports(_container(deployment))


def test_pods_are_hardened(docs):
    namespace = _one(docs, "Namespace", "ctp-node")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 2
    for deployment in deployments:
        pod = _pod(deployment)
        assert pod["automountServiceAccountToken"] is False
        # Service links would inject CTP_NODE_..._PORT variables: the node's override prefix.
        assert pod["enableServiceLinks"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == UID
        assert pod["securityContext"]["fsGroup"] == UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(key in pod for key in ("hostNetwork", "hostPID", "hostIPC"))
        for volume in pod["volumes"]:
            assert "hostPath" not in volume
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "privileged" not in context
            # Read-only root: the only writable paths are the pod's own emptyDirs, data folder and /tmp.
            mounts = _mounts(deployment)
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert writable == {DATA_DIR, "/tmp"}
            for path in writable:
                assert mounts[path]["emptyDir"]["sizeLimit"], f"{path}: an emptyDir with a sizeLimit"


def test_no_secret_in_plain_values(docs, toml_text, toml):
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator, not committed"
    for path in [*_manifest_files(), K8S / "kustomization.yaml"]:
        assert not CREDENTIAL_URL.search(path.read_text()), f"{path.name} holds a URL with credentials"
    assert "database_url" not in toml.get("jobs", {})
    # The object store's key pair: files from the Secret, never values (the loader refuses a plain
    # string too: test_configmap_toml_refuses_a_plain_credential).
    store = toml["storage"]["object_store"]
    for key in ("access_key_id", "secret_access_key"):
        assert set(store[key]) == {"file"} and store[key]["file"].startswith(f"/run/secrets/{S3_SECRET}/"), key
    assert "credentials_file" not in store and "aws_secret_access_key" not in toml_text.lower()
    for path in [*_manifest_files(), K8S / "README.md"]:
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", path.read_text()), f"{path.name}: an AWS key id"
    secret_refs: set[tuple[str, str]] = set()
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = _pod(deployment)
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for name, entry in env.items():
                if "value" in entry:
                    assert not SECRET_NAME.search(name), f"{name} has a plain value"
                    assert not CREDENTIAL_URL.search(entry["value"])
                elif "secretKeyRef" in entry["valueFrom"]:
                    ref = entry["valueFrom"]["secretKeyRef"]
                    secret_refs.add((ref["name"], ref["key"]))
            # The job store's URL (password included) from a Secret, overriding [jobs] database_url.
            assert env[DB_ENV]["valueFrom"]["secretKeyRef"] == {"name": "ctp-node-db", "key": "database-url"}
            assert "envFrom" not in container
        for volume in pod["volumes"]:
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    secret_refs.add((volume["secret"]["secretName"], item["key"]))
    assert secret_refs == {
        ("ctp-node-db", "database-url"),
        ("ctp-node-web", "web-token"),
        (S3_SECRET, "access-key-id"),
        (S3_SECRET, "secret-access-key"),
    }
    # Each one is created as the README tells the operator to: the Secrets and keys its
    # `kubectl create secret generic` commands make are exactly the ones the pods reference.
    assert _readme_secrets() == secret_refs
    # The status page's token is a file from the secret volume, not a value in the TOML.
    assert set(toml["web"]["token"]) == {"file"}
    assert "password" not in toml_text.lower().replace("basic_password_hash", "")


def _readme_secrets() -> set[tuple[str, str]]:
    """(Secret, key) of every `kubectl -n ctp-node create secret generic NAME --from-...=KEY=...` in the
    README (one command over continuation lines)."""
    text = (K8S / "README.md").read_text().replace("\\\n", " ")
    made = set()
    for command in re.findall(r"kubectl -n ctp-node create secret generic [^\n]+", text):
        name = command.split()[6]
        for key in re.findall(r"--from-(?:literal|file)=([\w.-]+)=", command):
            made.add((name, key))
    return made


def test_configmap_toml_loads_with_the_nodes_settings_loader(tmp_path, monkeypatch, docs, receiver, worker, toml_text):
    from ctp_node.cli.common import load_settings_or_exit  # what `ctp-node config --check` runs
    from ctp_node.config import CONFIG_ENV

    for name in [n for n in os.environ if n.startswith("CTP_NODE_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "ctp-node.toml"
    config.write_text(toml_text)
    fake_url = "postgresql+psycopg://ctp:not-a-real-password@db.example:5432/ctp"
    for deployment in (receiver, worker):
        container = _container(deployment)
        # The container's environment as the pod gets it: plain values as written, the Secret faked.
        for entry in container["env"]:
            monkeypatch.setenv(entry["name"], entry.get("value", fake_url))
        assert os.environ[CONFIG_ENV] == CONFIG_PATH
        config_dir, config_name = CONFIG_PATH.rsplit("/", 1)
        volume = _mounts(deployment)[config_dir]
        assert volume["configMap"]["name"] == "ctp-node-config"
        assert volume["configMap"]["items"] == [{"key": "ctp-node.toml", "path": config_name}]
        settings = load_settings_or_exit(config)  # exits 2 with the reasons when invalid
        assert settings.database_url == fake_url
        assert settings.jobs.lease_s == tomllib.loads(toml_text)["jobs"]["lease_s"]  # the file's keys still apply
        assert settings.jobs.heartbeat_s < settings.jobs.lease_s
        # The data folder is the pod's own emptyDir; the spool and results are in the object store.
        assert str(settings.storage.data_dir) == DATA_DIR and "emptyDir" in _mounts(deployment)[DATA_DIR]
        store = settings.storage.object_store
        assert store is not None and store.endpoint.startswith("https://")
        # Its key pair: files where this pod mounts the Secret ctp-node-s3.
        for name in ("access_key_id", "secret_access_key"):
            path = Path(getattr(store, name).file)
            volume = _mounts(deployment)[str(path.parent)]
            assert volume["secret"]["secretName"] == S3_SECRET
            assert path.name in [item["path"] for item in volume["secret"]["items"]]
        assert settings.destinations and settings.output.series_description.count("SYNTHETIC")
    # The token file: where the secret volume puts it, and readable by the node's own Credential.
    settings = load_settings_or_exit(config)
    token_file = Path(settings.web.token.file)
    volume = _mounts(receiver)[str(token_file.parent)]
    assert volume["secret"]["secretName"] == "ctp-node-web"
    assert [item["path"] for item in volume["secret"]["items"]] == [token_file.name]
    fake = tmp_path / token_file.name
    fake.write_text("a-token-of-at-least-16-characters\n")
    credential = settings.web.token.model_copy(update={"file": fake})
    assert credential.read() == "a-token-of-at-least-16-characters"
    # The object store's credential files, read the way the node reads them (object_store._credentials).
    from ctp_node.node.shared.object_store import _credentials

    store = settings.storage.object_store
    faked = {}
    for name, value in (("access_key_id", "fake-key-id"), ("secret_access_key", "fake-secret")):
        path = tmp_path / Path(getattr(store, name).file).name
        path.write_text(value + "\n")
        faked[name] = getattr(store, name).model_copy(update={"file": path})
    session = _credentials(store.model_copy(update=faked))
    assert session == {"aws_access_key_id": "fake-key-id", "aws_secret_access_key": "fake-secret"}


def test_configmap_toml_refuses_a_plain_credential(tmp_path, monkeypatch, toml_text):
    """The deliberate breakage: a key pair written into the ConfigMap's TOML fails `config --check`."""
    import typer

    from ctp_node.cli.common import load_settings_or_exit

    for name in [n for n in os.environ if n.startswith("CTP_NODE_")]:
        monkeypatch.delenv(name)
    plain = re.sub(r"secret_access_key = \{[^}]*\}", 'secret_access_key = "not-a-real-secret"', toml_text)
    assert plain != toml_text
    config = tmp_path / "ctp-node.toml"
    config.write_text(plain)
    with pytest.raises(typer.Exit) as exited:
        load_settings_or_exit(config)
    assert exited.value.exit_code == 2


def test_nothing_writable_is_shared_between_pods(docs, receiver, worker):
    """The multi-host topology: the pods share PostgreSQL and the object store, no volume; the one
    claim left is the workers' read-only model checkpoint."""
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert [c["metadata"]["name"] for c in claims] == ["ctp-node-weights"]
    for deployment in (receiver, worker):
        mounts = _mounts(deployment)
        data = mounts[DATA_DIR]
        assert set(data) == {"name", "emptyDir"} and data["emptyDir"]["sizeLimit"]
        for mount in _container(deployment)["volumeMounts"]:
            if "persistentVolumeClaim" in mounts[mount["mountPath"]]:
                assert mount.get("readOnly") is True, f"{mount['mountPath']}: a shared claim mounted writable"
    assert not any("persistentVolumeClaim" in volume for volume in _pod(receiver)["volumes"])
    # The old shared-folder topology is gone from what an operator reads, and the way to it is there.
    readme = (K8S / "README.md").read_text()
    for text in [readme, *(p.read_text() for p in _manifest_files())]:
        assert "ctp-node-data" not in text and not re.search(r"\binterim\b", text, re.IGNORECASE)
    assert "object store" in readme and f"create secret generic {S3_SECRET}" in readme
    assert "kubernetes/README.md" in (DEPLOY / "README.md").read_text()
