"""deploy/compose.yaml: valid against the Compose Specification, and wired the way the node needs.

The topology is the multi-host one on one host: the receiver and the workers share PostgreSQL and an
S3 bucket (the seaweedfs service, the bucket made by the one-shot create-bucket), no volume."""

from __future__ import annotations

import json
import re

import pytest

from ctp_node.config import OPEN_FILES_LIMIT, load_settings, open_files_needed
from tests.deploy.tools import COMPOSE_DIR, DEPLOY, SCHEMA_CACHE, missing, need_module

NODE_SERVICES = ("ctp-node", "worker-gpu0", "worker-gpu1")
WORKERS = ("worker-gpu0", "worker-gpu1")
ONE_SHOT = ("create-bucket",)  # runs once and exits 0; the node services wait for that
STORE = "seaweedfs"
DATA = "/var/lib/ctp-node"
CONFIG = "/etc/ctp-node/ctp-node.toml"


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = need_module("yaml", ".venv/bin/pip install pyyaml")
    # PyYAML resolves the x-ctp-node anchor and the << merges the way Compose does.
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def settings():
    return load_settings(COMPOSE_DIR / "ctp-node.toml")


def _interpolated(value: str) -> str:
    """The .env variable a value is taken from; it must be required (``${NAME:?message}``)."""
    match = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", str(value))
    assert match, f"{value!r}: not ${{VARIABLE:?...}} from deploy/.env"
    return match.group(1)


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source of the short-syntax volumes of a service."""
    out = {}
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        out[parts[1]] = parts[0]
    return out


def test_matches_the_compose_specification(compose):
    jsonschema = need_module("jsonschema", ".venv/bin/pip install jsonschema")
    if not SCHEMA_CACHE.is_file():
        missing(f"the Compose Specification schema ({SCHEMA_CACHE})", "bash tests/deploy/fetch-compose-schema.sh")
    schema = json.loads(SCHEMA_CACHE.read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema says draft-07
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_schema_check_can_fail(compose):
    """The validator rejects what Compose rejects (misspelt key, wrong type), so a pass means something."""
    jsonschema = need_module("jsonschema", ".venv/bin/pip install jsonschema")
    if not SCHEMA_CACHE.is_file():
        missing(f"the Compose Specification schema ({SCHEMA_CACHE})", "bash tests/deploy/fetch-compose-schema.sh")
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA_CACHE.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["ctp-node"]["depend_on"] = ["postgres"]
    broken["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    assert len(list(validator.iter_errors(broken))) == 2


def test_services_and_images(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "orthanc", "prometheus", STORE, *ONE_SHOT, *NODE_SERVICES}
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services[STORE]["image"].startswith("chrislusf/seaweedfs:")
    assert services["create-bucket"]["image"].startswith("amazon/aws-cli:")
    for name, service in services.items():
        image = service["image"]
        assert ":" in image.split("/")[-1] and not image.endswith(":latest"), f"{name}: pin the image, got {image}"
        expected = {"no"} if name in ONE_SHOT else {"unless-stopped", "always", "on-failure"}
        assert service.get("restart") in expected, name
    assert services["ctp-node"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / ".." / services["ctp-node"]["build"]["dockerfile"]).is_file()


def test_roles_and_gpu_reservations(compose):
    services = compose["services"]
    assert services["ctp-node"]["command"][0] == "serve"
    assert "deploy" not in services["ctp-node"], "the receiver needs no GPU"
    host_gpus = []
    for name in WORKERS:
        service = services[name]
        command = service["command"]
        assert command[0] == "worker"
        device = command[command.index("--device") + 1]
        (reservation,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]
        ids = reservation["device_ids"]
        assert len(ids) == 1, f"{name}: one GPU per worker"
        # Only the reserved GPUs are visible in the container, numbered from 0.
        index = int(re.fullmatch(r"cuda:(\d+)", device).group(1))
        assert index < len(ids), f"{name}: --device {device} but the container sees {len(ids)} GPU(s)"
        host_gpus += ids
        # A worker has no DICOM listener: the image's C-ECHO health check must be off.
        assert service["healthcheck"] == {"disable": True}
        # SIGTERM finishes the current series: the grace period must be long enough for one.
        assert re.fullmatch(r"\d+m", service["stop_grace_period"]) and int(service["stop_grace_period"][:-1]) >= 5
    assert sorted(host_gpus) == ["0", "1"], "each worker reserves its own GPU"


def test_node_services_share_config_database_and_bucket_but_no_volume(compose, settings):
    services = compose["services"]
    volumes = compose["volumes"]
    for name in NODE_SERVICES:
        mounts = _mounts(services[name])
        assert mounts[DATA] in volumes, f"{name}: {DATA} must be a named volume"
        assert mounts[CONFIG] == "./compose/ctp-node.toml", name
        assert services[name]["volumes"][[v.split(":")[1] for v in services[name]["volumes"]].index(CONFIG)].endswith(
            ":ro"
        )
        assert services[name]["environment"]["CTP_NODE_CONFIG"] == CONFIG
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        # The node refuses to start without its bucket: it waits until create-bucket has made it.
        assert depends[STORE]["condition"] == "service_healthy"
        assert depends["create-bucket"]["condition"] == "service_completed_successfully"
        assert {"jobs-db", "dicom", "object-store"} <= set(services[name]["networks"])
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    # The multi-host topology: each node service has a data volume of its own, shared with nothing.
    data_volumes = [_mounts(services[n])[DATA] for n in NODE_SERVICES]
    assert len(set(data_volumes)) == len(NODE_SERVICES)
    for name, service in services.items():
        for volume in data_volumes:
            assert name in NODE_SERVICES or volume not in _mounts(service).values(), f"{name} mounts {volume}"
    assert "ctp-node-data" not in volumes
    for name in WORKERS:
        assert services[name]["depends_on"]["ctp-node"]["condition"] == "service_healthy"
        assert any(v.endswith(":/weights:ro") for v in services[name]["volumes"]), f"{name}: the checkpoint"
    assert str(settings.storage.data_dir) == DATA
    assert settings.storage.object_store is not None, "the spool and results are in the object store"


def test_object_store_and_its_bucket(compose, settings):
    services = compose["services"]
    store, bucket_job = services[STORE], services["create-bucket"]
    config = settings.storage.object_store
    # The node's endpoint is the seaweedfs service's S3 port, on the internal object-store network.
    match = re.fullmatch(r"http://([\w-]+):(\d+)", config.endpoint)
    assert match and match.group(1) == STORE, config.endpoint
    port = match.group(2)
    assert store["command"][:2] == ["server", "-s3"]
    assert "-master.volumePreallocate=false" in store["command"]
    assert f"http://127.0.0.1:{port}/healthz" in store["healthcheck"]["test"]
    assert _mounts(store)["/data"] in compose["volumes"]
    assert "ports" not in store and store["networks"] == ["object-store"]
    assert compose["networks"]["object-store"]["internal"] is True
    # The one-shot makes exactly the configured bucket at exactly that endpoint, once the store is up,
    # and stops trying after a bounded number of tries.
    (script,) = bucket_job["command"]
    assert bucket_job["entrypoint"] == ["/bin/sh", "-c"]
    assert f"--endpoint-url {config.endpoint} s3api create-bucket --bucket {config.bucket} " in script
    assert f"s3api head-bucket --bucket {config.bucket} " in script
    assert re.search(r"for try in \$\$\(seq 1 \d+\)", script) and script.rstrip().endswith("exit 1")
    assert bucket_job["depends_on"] == {STORE: {"condition": "service_healthy"}}
    assert bucket_job["networks"] == ["object-store"] and "ports" not in bucket_job
    assert bucket_job["environment"]["AWS_DEFAULT_REGION"] == config.region
    # One key pair from deploy/.env: the store accepts it, the one-shot and the node use it. The node
    # reads it from the variables its TOML names ({env = ...}), set in every node service.
    pair = {key: _interpolated(value) for key, value in store["environment"].items()}
    assert set(pair) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for key, variable in pair.items():
        assert _interpolated(bucket_job["environment"][key]) == variable
    node_names = {config.access_key_id.env: "AWS_ACCESS_KEY_ID", config.secret_access_key.env: "AWS_SECRET_ACCESS_KEY"}
    for name in NODE_SERVICES:
        for env_name, key in node_names.items():
            assert _interpolated(services[name]["environment"][env_name]) == pair[key], name
    example = (COMPOSE_DIR / "env.example").read_text()
    for variable in pair.values():
        assert re.search(rf"^{variable}=", example, re.MULTILINE), f"env.example does not mention {variable}"


def test_node_services_state_the_open_files_limit_of_the_systemd_units(compose, settings):
    for name in NODE_SERVICES:
        assert compose["services"][name]["ulimits"]["nofile"] == {"soft": OPEN_FILES_LIMIT, "hard": OPEN_FILES_LIMIT}
    assert open_files_needed(settings) <= OPEN_FILES_LIMIT, "the compose configuration's caps need more"


def test_postgres_is_the_job_store(compose, settings):
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert _mounts(postgres)["/var/lib/postgresql/data"] in compose["volumes"]
    url = settings.jobs.database_url
    assert url.startswith("postgresql+psycopg://"), url
    match = re.fullmatch(r"postgresql\+psycopg://(\w+)@(\w[\w-]*):(\d+)/(\w+)", url)
    assert match, f"{url}: no password in the mounted file (PGPASSWORD), host = the postgres service"
    user, host, port, database = match.groups()
    assert (host, port) == ("postgres", "5432")
    assert postgres["environment"]["POSTGRES_USER"] == user and postgres["environment"]["POSTGRES_DB"] == database
    # Only the node services and PostgreSQL are on the internal job-store network; nothing published.
    assert compose["networks"]["jobs-db"]["internal"] is True
    assert "ports" not in postgres and postgres["networks"] == ["jobs-db"]


def test_no_secret_in_committed_files(compose):
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if re.search("PASSWORD|USERS|SECRET|ACCESS_KEY|TOKEN", key):
                assert "${" in str(value) and ":?" in str(value), f"{name}: {key} must come from .env, got {value!r}"
    # The mounted files carry no credential: the database URL has no password (checked above too),
    # the object store's key pair is named by environment variable ({env = ...}, never a value: the
    # loader refuses a plain string), Orthanc's users come from the environment.
    settings = load_settings(COMPOSE_DIR / "ctp-node.toml")
    userinfo = settings.jobs.database_url.split("://")[1].rsplit("@", 1)[0]
    assert ":" not in userinfo, "no password in jobs.database_url: PGPASSWORD carries it"
    store = settings.storage.object_store
    for credential in (store.access_key_id, store.secret_access_key):
        assert credential.env and credential.file is None
    assert store.credentials_file is None
    text = (DEPLOY / "compose.yaml").read_text() + (COMPOSE_DIR / "ctp-node.toml").read_text()
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), "an AWS key id in a committed file"

    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys(value)

    orthanc_keys = set(keys(json.loads((COMPOSE_DIR / "orthanc.json").read_text())))
    assert not {k for k in orthanc_keys if re.search("password|users|credential", k, re.I)}
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_published_ports_are_deliberate(compose, settings):
    services = compose["services"]
    assert "ports" not in services["worker-gpu0"] and "ports" not in services["worker-gpu1"]
    assert not any("ports" in services[name] for name in ("postgres", STORE, *ONE_SHOT))
    # The node's DICOM port is reached by Orthanc over the compose network only.
    assert all(not p.endswith(f":{settings.dicom.port}") for p in services["ctp-node"].get("ports", []))
    assert services["ctp-node"]["ports"] == [f"127.0.0.1:{settings.metrics.port}:{settings.metrics.port}"]
    for port in services["orthanc"]["ports"]:
        assert port.startswith(("127.0.0.1:", "${ORTHANC_DICOM_BIND:-127.0.0.1}:")), port
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]


def test_prometheus_scrapes_the_receiver_and_every_worker(compose, settings):
    """Without it (or without the workers' metrics ports) the Grafana dashboard's panels stay empty."""
    yaml = need_module("yaml", ".venv/bin/pip install pyyaml")
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    assert mounts["/etc/prometheus/prometheus.yml"] == "./compose/prometheus.yml"
    assert prometheus["volumes"][0].endswith(":ro") and mounts["/prometheus"] in compose["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {
        target: job["job_name"]
        for job in scrape["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {f"ctp-node:{settings.metrics.port}"}
    for name in WORKERS:
        command = services[name]["command"]
        assert "--metrics-port" in command, f"{name} serves no metrics"
        expected.add(f"{name}:{command[command.index('--metrics-port') + 1]}")
    assert set(targets) == expected
    # The workers in a job of their own, apart from the receiver's.
    worker_jobs = {targets[t] for t in expected if t.startswith("worker-")}
    assert len(worker_jobs) == 1 and targets[f"ctp-node:{settings.metrics.port}"] not in worker_jobs
    # Reachable: the node services listen on every interface of their container, on a network
    # they share with Prometheus.
    assert settings.metrics.bind_address == "0.0.0.0"
    for name in NODE_SERVICES:
        assert set(prometheus["networks"]) & set(services[name]["networks"]), name
    assert "internal" not in compose["networks"][prometheus["networks"][0]]  # its port is published


def test_node_destination_is_the_orthanc_service(compose, settings):
    orthanc = json.loads((COMPOSE_DIR / "orthanc.json").read_text())
    (pacs,) = settings.destinations
    assert pacs.host == "orthanc" and "orthanc" in compose["services"]
    assert (pacs.port, pacs.ae_title) == (orthanc["DicomPort"], orthanc["DicomAet"])
    # Orthanc only accepts stores from registered modalities: the node's calling AE title must be one.
    assert orthanc["DicomAlwaysAllowStore"] is False
    assert settings.dicom.ae_title in {m["AET"] for m in orthanc["DicomModalities"].values() if m.get("AllowStore")}
    # ... and the node only accepts Orthanc (and its own health check).
    callers = {(c.ae_title, c.host) for c in settings.dicom.allowed_callers}
    assert (orthanc["DicomAet"], None) in callers
    assert (settings.dicom.ae_title, "127.0.0.1") in callers


def test_orthanc_mounts_its_configuration_and_lua(compose):
    orthanc = compose["services"]["orthanc"]
    mounts = _mounts(orthanc)
    config = json.loads((COMPOSE_DIR / "orthanc.json").read_text())
    (script,) = config["LuaScripts"]
    assert mounts[script] == "./compose/autoroute.lua" and (COMPOSE_DIR / "autoroute.lua").is_file()
    json_mounts = [path for path in mounts if path.startswith("/etc/orthanc/") and path.endswith(".json")]
    assert [mounts[p] for p in json_mounts] == ["./compose/orthanc.json"]
    assert mounts["/var/lib/orthanc/db"] in compose["volumes"]
