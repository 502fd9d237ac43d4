"""The node's one configuration: a TOML file, every key overridable by an environment variable.

Precedence (highest first): environment (``CTP_NODE_<SECTION>__<KEY>``, e.g.
``CTP_NODE_DICOM__PORT=11113``), the TOML file (``--config`` or ``CTP_NODE_CONFIG``), embedded
defaults. Defaults need no external service: a SQLite job store and a spool under one data folder.
Each part of the node receives only the section it needs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ctp_node.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable characters, no backslash
CONFIG_ENV = "CTP_NODE_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


class AllowedCaller(Section):
    """A calling AE title that may send to the node, optionally only from one host (IP address)."""

    ae_title: str
    host: str | None = None

    _check_ae = field_validator("ae_title")(_ae_title)


class TLSSettings(Section):
    """DICOM TLS: the node's certificate and key; a CA bundle to verify (and require) client certificates."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


class DicomSettings(Section):
    ae_title: str = "CTPNODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_pdu_bytes: int = Field(131072, ge=4096, le=2**31 - 1)
    max_associations: int = Field(10, ge=1, le=1000)
    acse_timeout_s: float = Field(30, gt=0)
    dimse_timeout_s: float = Field(30, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    # Hostile or broken peers (ctp_node/node/receive/scp.py). A connection is "pending" from the moment it is
    # accepted until its A-ASSOCIATE-RQ has arrived in full (after the TLS handshake, with TLS), which
    # must happen within acse_timeout_s. Pending connections hold no thread and do not count against
    # max_associations; at most this many at once, the oldest closed to make room for a new one, so
    # silent or stalled connections cannot lock a scanner out.
    max_pending_connections: int = Field(64, ge=1, le=512)
    # Connections from one address at once, pending or associated: a new one beyond it closes that
    # address's oldest pending connection (or is itself closed when all of them are associations), so
    # one host cannot crowd out the others' pending connections.
    max_connections_per_host: int = Field(16, ge=1, le=1000)
    listen_backlog: int = Field(256, ge=5, le=65535)  # connections the kernel queues before they are accepted
    # The largest instance accepted (C-STORE and STOW-RS alike): a C-STORE whose data set grows past it
    # is ended with A-ABORT before more is read (the data set goes to a file in the spool as it arrives,
    # so this bounds spool disk per association, not memory), a STOW-RS part is refused (0xA700). 64 MiB
    # is 32 classic 1024 x 1024 CT images, or an Enhanced CT instance of 128 frames of 512 x 512 (a
    # perfusion volume of 1.25 mm slices over 16 cm); raise it for a scanner that sends a whole series
    # as one instance.
    max_instance_bytes: int = Field(64 << 20, ge=1 << 20, le=2**32 - 1)
    # How long an association's reactor sleeps when it finds nothing to do (pynetdicom's default
    # is 1 ms, on the path of every PDU). Lower is faster ingest, at a cost while an association is
    # open and idle: about 15 % of a core at 0.2 ms, 6 % at 1 ms (measured on the 2-core dev VM).
    poll_interval_ms: float = Field(0.2, ge=0.01, le=100)
    allowed_callers: tuple[AllowedCaller, ...] = ()  # empty: any calling AE title is accepted
    tls: TLSSettings | None = None

    _check_ae = field_validator("ae_title")(_ae_title)


class SeriesSettings(Section):
    """When a received series is queued (``ctp_node.node.shared.completeness`` judges whether it looks whole)."""

    quiet_period_s: float = Field(60, gt=0, description="A series is complete after this long without a new instance")
    # A series whose slice positions all hold the same number of instances (and no volume lacks a
    # slice) is queued after this shorter wait (never longer than quiet_period_s); not one that was
    # re-opened by a late instance.
    complete_quiet_period_s: float = Field(10, gt=0)
    # A series that looks incomplete waits this long (never shorter than quiet_period_s) without a
    # new instance for the rest, then is queued anyway with a warning on the job and in the log.
    incomplete_wait_s: float = Field(600, gt=0)
    min_time_points: int = Field(3, ge=2)
    # Largest Rows and Columns a series may state; beyond it the job fails at assembly with the reason,
    # before memory is allocated for its pixels (ctp_node.series.assemble.DEFAULT_MAX_MATRIX).
    max_matrix: int = Field(1024, ge=16, le=65535)


class Credential(Section):
    """A secret read at start from an environment variable or a file, never from the TOML itself
    (configuration files get copied and shared), and never logged."""

    env: str | None = None  # the name of the environment variable that holds it
    file: Path | None = None  # a file holding it (surrounding whitespace is dropped)

    @model_validator(mode="after")
    def _one_source(self) -> Credential:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env (a variable's name) or file (a path) for a secret")
        return self

    def read(self) -> str:
        """The secret; ConfigError saying what to set when it is missing or empty."""
        if self.env is not None:
            value = os.environ.get(self.env, "")
            where = f"environment variable {self.env}"
        else:
            assert self.file is not None
            try:
                value = self.file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the secret file {self.file}: {exc.strerror or exc}") from exc
            where = f"file {self.file}"
        if not value:
            raise ConfigError(f"the secret is empty: set the {where}")
        return value


DEFAULT_DATA_DIR = Path("/var/lib/ctp-node")
# S3 bucket names (AWS's rules, which S3-compatible stores follow): 3-63 lowercase letters, digits,
# dots and hyphens, starting and ending with a letter or digit.
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ObjectStoreSettings(Section):
    """An S3-compatible object store holding the spool and the results (``ctp_node/node/shared/object_store.py``).

    TLS is the endpoint's scheme (``https://``), verified against the system's CAs or ``ca_certificates``.
    Credentials are never TOML values: ``access_key_id`` and ``secret_access_key`` are read from an
    environment variable or a file (``{env = ...}`` / ``{file = ...}``), or ``credentials_file`` names an
    AWS-style credentials file (``profile`` in it); with none of them, boto3's own chain applies
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a pod's web identity, an instance role).
    """

    endpoint: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")  # e.g. https://s3.example.org:9000
    bucket: str
    region: str = "us-east-1"
    # Keys are <prefix>spool/<study>/<series>/<sop>.dcm and <prefix>results/...: several nodes may share a bucket.
    prefix: str = Field("", pattern=r"^([A-Za-z0-9._-]+/)*$")
    ca_certificates: Path | None = None  # a private CA's bundle (https only)
    access_key_id: Credential | None = None
    secret_access_key: Credential | None = None
    credentials_file: Path | None = None
    profile: str | None = None
    # One request (connect, or a read) may take this long; an instance's PUT is tried at most twice, so
    # a sender waits at most about twice this for a refusal when the store hangs.
    timeout_s: float = Field(10, gt=0, le=300)

    @field_validator("access_key_id", "secret_access_key", mode="before")
    @classmethod
    def _never_plain(cls, value: object) -> object:
        if isinstance(value, str):  # configuration files get copied and shared: no credential in them
            raise ValueError('never a plain value here: give {env = "VARIABLE"} or {file = "/path/to/file"}')
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not BUCKET_NAME.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not an S3 bucket name (3-63 lowercase letters, digits, dots and hyphens)")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> ObjectStoreSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        if self.access_key_id is not None and self.credentials_file is not None:
            raise ValueError("give access_key_id/secret_access_key or credentials_file, not both")
        if self.profile is not None and self.credentials_file is None:
            raise ValueError("profile names a section of credentials_file, which is not given")
        if self.ca_certificates is not None and not self.endpoint.startswith("https://"):
            raise ValueError("ca_certificates is for an https:// endpoint")
        return self


class StorageSettings(Section):
    # Absolute, so that where patient data lands never depends on the folder the node was started
    # from; the systemd units and the container use this folder too.
    data_dir: Path = DEFAULT_DATA_DIR
    # None: the spool and the results are folders under data_dir (one host, or a shared filesystem).
    # Set: they live in this S3-compatible store, and a host keeps only instances being received
    # (spool/.incoming) and a scratch folder (a series being processed, a result being sent).
    object_store: ObjectStoreSettings | None = None
    # The receiver answers C-STORE and STOW-RS with 0xA700 (out of resources) while the disk holding
    # the spool (or, with an object store, its .incoming folder) has less than this free; a worker
    # claims no job while its scratch folder's disk has less. 0: no floor (only a full disk refuses).
    min_free_mb: int = Field(256, ge=0)
    # How often the receiver checks the job store and the object store (each refusal also marks its
    # resource down at once); a resource that is down is refused until a check finds it back.
    check_interval_s: float = Field(5, gt=0, le=3600)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(
                f"data_dir {str(value)!r} is relative: give an absolute path (e.g. {DEFAULT_DATA_DIR}), "
                "so the data never depends on the folder the node is started from"
            )
        return value

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def audit_log(self) -> Path:
        return self.data_dir / "audit.jsonl"

    @property
    def scratch_dir(self) -> Path:
        """Where a worker with an object store downloads a series and stages a result (emptied per job)."""
        return self.data_dir / "scratch"


class JobSettings(Section):
    database_url: str | None = None  # None: SQLite file in the data folder
    lease_s: float = Field(300, gt=0)
    heartbeat_s: float = Field(30, gt=0)
    max_attempts: int = Field(3, ge=1)
    # A worker whose loop fails outside any one job (the job store or its disk unavailable, e.g. full)
    # waits 1 s, then twice as long after each further failure, at most this long (issue 23).
    error_backoff_max_s: float = Field(60, gt=0)

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> JobSettings:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than lease_s ({self.lease_s})")
        return self


class ModelSettings(Section):
    checkpoint: Path | None = None
    # None: the checkpoint's recommended sampler and steps when it carries them, else DPM-Solver++(2M),
    # 20 steps (model.engine.choose_sampling).
    sampler: Literal["dpmpp_2m", "ddim", "ancestral"] | None = None
    steps: int | None = Field(None, ge=1)
    spacing: Literal["logsnr", "karras", "uniform"] = "logsnr"
    batch_size: int | None = Field(None, ge=1)
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool | None = None
    max_memory_gib: float = Field(20, gt=0)
    seed: int = 0
    long_gap: Literal["error", "linear"] = "linear"


class GuardrailSettings(Section):
    """The per-series check of the synthetic seconds against the acquired ones (ctp_node/series/guardrail.py).

    ``policy``: ``flag`` sends a failing series as it is, flagged in the job, the log and every
    image's ImageComments; ``fallback`` replaces the model's seconds by linear interpolation (marked
    so); ``off`` skips the check. Tolerances are in HU, sized for 6-10 HU image noise: class means
    and the mean curve average thousands of voxels, so noise moves them by hundredths of a HU.
    """

    policy: Literal["flag", "fallback", "off"] = "flag"
    # |mean(synthetic - interpolated)| per tissue class over all synthetic seconds.
    class_offset_hu: float = Field(1.0, gt=0)
    # Mean |synthetic - interpolated| of the brain's mean curve at the seconds next to an acquired one.
    step_hu: float = Field(1.0, gt=0)
    # A synthetic voxel further than this outside the range of its two acquired neighbours is out of range ...
    range_margin_hu: float = Field(25.0, ge=0)
    # ... and more than this fraction of such voxels fails the series.
    range_fraction: float = Field(0.01, ge=0, le=1)
    # Tissue classes by the voxel's baseline HU: CSF below the first edge, white matter up to the second, grey above.
    class_edges_hu: tuple[float, float] = (20.0, 32.0)
    min_class_voxels: int = Field(500, ge=1)
    # After the perfusion analyses: the synthetic series' core and Tmax > 6 s volumes may differ from the
    # acquired series' own (where that one reports them) by at most this much; a larger jump is flagged
    # and the synthetic volume withheld (mL; 0 = off).
    volume_jump_ml: float = Field(15.0, ge=0)

    @model_validator(mode="after")
    def _edges_ordered(self) -> GuardrailSettings:
        low, high = self.class_edges_hu
        if not low < high:
            raise ValueError(f"class_edges_hu must be increasing, got {self.class_edges_hu}")
        return self


class MotionSettings(Section):
    """Head motion (ctp_node/series/motion.py): rigid registration of every volume to the baseline,
    and volumes registration cannot rescue marked unusable (inpainted like a gap).

    On by default: stroke patients move during a minute of scanning, a moved volume corrupts every
    voxel's curve near an edge, and a still series comes out unchanged (volumes that moved less than
    ``min_correction_mm`` are not resampled; nothing is flagged). Thresholds are physical (mm, HU)
    and must also be robust outliers (``outlier_z``, median/MAD z-score) against the series itself.
    """

    enabled: bool = True
    reference_volumes: int = Field(3, ge=1)  # reference: voxelwise median of the first volumes (baseline)
    registration_pixel_mm: float = Field(2.0, gt=0)  # in-plane pixel the registration works at
    bone_hu: tuple[float, float] = (700.0, 1700.0)  # the anchor: skull; enhancing vessels stay below it
    min_correction_mm: float = Field(0.5, ge=0)  # smaller displacements are left alone (not resampled)
    # Resampling of moved volumes: "bspline" (cubic) blurs them less than "linear" (docs/benchmarks.md).
    interpolation: Literal["linear", "bspline"] = "linear"
    max_misalignment_mm: float = Field(1.0, gt=0)  # residual (or slice step) larger than this: unusable
    outlier_z: float = Field(5.0, gt=0)
    baseline_offset_hu: float = Field(2.0, gt=0)  # baseline volume's mean brain HU off the others'
    baseline_noise_ratio: float = Field(2.0, gt=1)  # baseline volume's RMS difference vs the others'
    threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _window_ordered(self) -> MotionSettings:
        low, high = self.bone_hu
        if not low < high:
            raise ValueError(f"bone_hu must be increasing, got {self.bone_hu}")
        return self


class DicomwebAuth(Section):
    """How the node authenticates to a DICOMweb destination: a bearer token, or HTTP basic."""

    kind: Literal["bearer", "basic"]
    secret: Credential  # the token (bearer) or the password (basic)
    username: str | None = None  # basic only

    @model_validator(mode="after")
    def _basic_has_user(self) -> DicomwebAuth:
        if (self.kind == "basic") != (self.username is not None):
            raise ValueError("username is required with kind = 'basic' and only there")
        return self


class Destination(Section):
    """Where results go: a DICOM peer over C-STORE (kind dimse: host, port, ae_title) or a DICOMweb
    service over STOW-RS (kind dicomweb: url, e.g. https://pacs.example/dicom-web, optional auth)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["dimse", "dicomweb"] = "dimse"
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    ae_title: str | None = None
    url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    auth: DicomwebAuth | None = None
    ca_certificates: Path | None = None  # dicomweb over https with a private CA
    timeout_s: float = Field(60, gt=0)  # dicomweb: connect and read timeout of each request

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> Destination:
        dimse = {"host": self.host, "port": self.port, "ae_title": self.ae_title}
        dicomweb = {"url": self.url, "auth": self.auth, "ca_certificates": self.ca_certificates}
        own, other = (dimse, dicomweb) if self.kind == "dimse" else (dicomweb, dimse)
        required = ("host", "port", "ae_title") if self.kind == "dimse" else ("url",)
        missing = [k for k in required if own[k] is None]
        extra = [k for k, v in other.items() if v is not None]
        if missing or extra:
            raise ValueError(
                f"destination {self.name!r} (kind {self.kind}) "
                + (f"needs {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"does not take {', '.join(extra)}" if extra else "")
            )
        return self


class SendSettings(Section):
    max_attempts: int = Field(6, ge=1)
    initial_backoff_s: float = Field(30, gt=0)
    backoff_multiplier: float = Field(2, ge=1)
    max_backoff_s: float = Field(1800, gt=0)


class OutputSettings(Section):
    series_number_offset: int = Field(1000, ge=0, description="Derived SeriesNumber = source + offset")
    series_description: str = Field("1s SYNTHETIC - RESEARCH USE ONLY", max_length=64)


class PerfusionOutputSettings(Section):
    """The perfusion outputs sent with each job's synthetic series (ctp_node/series/outputs/), each its own
    series and each switchable; all marked research use only."""

    enabled: bool = True
    quantitative_maps: bool = True  # CBF, CBV, MTT, Tmax as derived CT images with rescale and units
    colour_maps: bool = True  # the same maps as colour Secondary Capture with scale bars
    structured_report: bool = True  # volumes as a TID 1500 SR
    segmentation: bool = True  # core, Tmax > 6 s, Tmax > 10 s masks as DICOM SEG
    qa_report: bool = True  # one-page QA report: PNG in the job folder and Secondary Capture
    from_acquired: bool = True  # also the maps, SR and SEG of the acquired series alone, for comparison
    # When a lesion volume is withheld instead of reported (ctp_node/perfusion/reliability.py; 0 = check off):
    # more than this much of a lesion class in the less affected hemisphere (mL) ...
    mirror_limit_ml: float = Field(5.0, ge=0)
    # ... or a bolus acquired at longer intervals than these (s; synthetic seconds do not count).
    tmax_max_interval_s: float = Field(2.0, ge=0)
    core_max_interval_s: float = Field(2.0, ge=0)
    # ... or the core volume's 95 % range under the study's own noise wider than -+ this (mL; noise-injected
    # replicates of the analysis, ctp_node/perfusion/uncertainty.py).
    noise_limit_ml: float = Field(5.0, ge=0)
    series_number_offset: int = Field(2000, ge=0, description="Output SeriesNumbers = source + offset + index")


# ctp_node/node/shared/notify.py sends them (README: "How to be told").
WebhookEvent = Literal["series.received", "result.delivered", "job.delivered", "job.failed", "job.ignored"]


class Webhook(Section):
    """One webhook receiver (ctp_node/node/shared/notify.py): JSON POSTs signed with HMAC-SHA256."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # in logs and metric labels (never the URL)
    url: str = Field(pattern=r"^https?://[^\s]+$")
    secret: Credential
    # job.ignored (a series that is not CTP) only when listed: where the PACS routes every CT series,
    # it would come for each ordinary head CT.
    events: tuple[WebhookEvent, ...] = ("series.received", "result.delivered", "job.delivered", "job.failed")
    ca_certificates: Path | None = None


class NotifySettings(Section):
    """Webhooks, sent from one background thread per webhook so that receiving never waits on them.

    ``timeout_s`` bounds a whole try (connect, request, status and headers), not each read.
    """

    webhooks: tuple[Webhook, ...] = ()
    timeout_s: float = Field(10, gt=0)
    max_attempts: int = Field(8, ge=1)
    initial_backoff_s: float = Field(2, gt=0)
    max_backoff_s: float = Field(600, gt=0)
    max_pending: int = Field(1000, ge=1)  # notifications held for retry at once; the oldest is dropped beyond

    @model_validator(mode="after")
    def _unique_names(self) -> NotifySettings:
        names = [w.name for w in self.webhooks]
        if len(names) != len(set(names)):
            raise ValueError(f"webhook names must be unique, got {names}")
        return self


class MetricsSettings(Section):
    port: int | None = Field(None, ge=1, le=65535)  # None: no Prometheus endpoint
    bind_address: str = "127.0.0.1"


class WebSettings(Section):
    """The status page (``ctp_node/web``) that `ctp-node serve` runs beside the receiver when enabled.

    Everything but ``/healthz`` needs authentication: a bearer token (scripts, at least 16
    characters) and/or HTTP basic authentication with a user and a scrypt hash of its password
    (browsers; ``python -m ctp_node.web.passwords`` makes the hash). Both are credentials, read at
    start from an environment variable or a file, never from the TOML and never logged. Bound to
    loopback: other machines go through a TLS reverse proxy (deploy/README.md).
    """

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    root_path: str = Field("", pattern=r"^(/[A-Za-z0-9._~-]+)*$")  # the prefix a reverse proxy serves it under
    token: Credential | None = None  # e.g. {file = "/etc/ctp-node/web-token"}
    basic_user: str | None = Field(None, pattern=r"^[^:\s]{1,64}$")
    basic_password_hash: Credential | None = None  # e.g. {file = "/etc/ctp-node/web-password.hash"}
    # Patient name as initials and patient ID as its last 3 characters; off shows them whole.
    mask_patient: bool = True
    # Origins besides the page's own (scheme://host[:port]) from which actions may be posted.
    allowed_origins: tuple[str, ...] = ()
    jobs_per_page: int = Field(100, ge=1, le=1000)
    # Connections held at once (browsers, scripts, STOW-RS uploads, a reverse proxy's upstream
    # connections); one more is answered 503 and closed as it opens, so that a flood of connections
    # cannot use up the process's file descriptors (README: Limits). Counted in open_files_needed().
    max_connections: int = Field(64, ge=1, le=512)
    # A connection must have sent its request line and headers this long after it opened (or after
    # its previous response); else it is closed: a slow-loris peer cannot hold it. Request bodies
    # have their own limit (STOW-RS: dicom.network_timeout_s between two pieces).
    header_timeout_s: float = Field(10, gt=0, le=300)

    @model_validator(mode="after")
    def _authentication(self) -> WebSettings:
        if (self.basic_password_hash is None) != (self.basic_user is None):
            raise ValueError("web: basic authentication needs both basic_user and basic_password_hash")
        if self.enabled and self.basic_user is None and self.token is None:
            raise ValueError(
                "web: the status page needs authentication: a token ({file = ...} or {env = ...}), and/or "
                "basic_user with basic_password_hash (python -m ctp_node.web.passwords makes the hash)"
            )
        return self


class DicomwebSettings(Section):
    """STOW-RS into the node (``ctp_node/web/stow.py``), served by the status page's web server under
    ``/dicomweb`` with its authentication. The same checks, spool and job store as C-STORE; the
    request body waits on disk (never in memory) and may be at most ``max_request_bytes``; the DICOM
    limits apply too (``dicom.network_timeout_s`` between two pieces of a body, ``dicom.max_associations``
    requests at once)."""

    stow_enabled: bool = False
    max_request_bytes: int = Field(4 << 30, ge=1 << 20)


class Settings(BaseSettings):
    """Everything the node reads at start; validated once, then passed down section by section."""

    model_config = SettingsConfigDict(env_prefix="CTP_NODE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    dicom: DicomSettings = DicomSettings()
    series: SeriesSettings = SeriesSettings()
    storage: StorageSettings = StorageSettings()
    jobs: JobSettings = JobSettings()
    model: ModelSettings = ModelSettings()
    guardrail: GuardrailSettings = GuardrailSettings()
    motion: MotionSettings = MotionSettings()
    destinations: tuple[Destination, ...] = ()
    send: SendSettings = SendSettings()
    output: OutputSettings = OutputSettings()
    perfusion_outputs: PerfusionOutputSettings = PerfusionOutputSettings()
    metrics: MetricsSettings = MetricsSettings()
    notify: NotifySettings = NotifySettings()
    dicomweb: DicomwebSettings = DicomwebSettings()
    web: WebSettings = WebSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment must override them.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique, got {names}")
        return self

    @property
    def database_url(self) -> str:
        return self.jobs.database_url or f"sqlite:///{(self.storage.data_dir / 'jobs.sqlite').resolve()}"

    def to_toml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the TOML file (``path``, else ``$CTP_NODE_CONFIG``, else none) under the environment."""
    path = path or os.environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"configuration file {file} does not exist")
        try:
            data = tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}:\n{describe_errors(exc)}") from exc
    except ValueError as exc:
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}:\n{exc}") from exc


def describe_errors(error: ValidationError) -> str:
    """One line per bad key: where, what is wrong, the value given. pydantic's own text adds a line
    per error pointing to its documentation site, which says nothing about this node's keys."""
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check its spelling and section)")
        elif item["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            shown = item.get("input")
            # The value helps find the typo, except where it may be a credential: never print those.
            secret = re.search(r"token|secret|password|hash|url|access_key", where, re.IGNORECASE)
            given = "" if isinstance(shown, (dict, list, tuple)) or secret else f" (got {shown!r})"
            lines.append(f"  {where}: {message}{given}")
    return "\n".join(lines)


# What `ctp-node serve` may hold open at once, by the caps above (README: Limits). The systemd units'
# LimitNOFILE and compose's `ulimits: nofile` are 1024: pynetdicom polls each association's socket with
# select(), which fails for a descriptor numbered 1024 or more, so a higher limit would only move the
# failure; the caps keep the node well below it instead (tests/deploy check the sum for the defaults).
BASE_OPEN_FILES = 128  # interpreter, logs, listeners, metrics: 17 measured for `serve`; room for a GPU driver's
FILES_PER_ASSOCIATION = 3  # the socket, the instance being spooled, its folder (fsync)
FILES_PER_HTTP_CONNECTION = 2  # the socket, a STOW-RS body waiting on disk
# Beyond the served connections, the web server may hold as many refused ones while they read their
# 503 (ctp_node.web.server), plus what one pass of its accept loop takes in before refusing any: at
# most the listen backlog.
HTTP_LISTEN_BACKLOG = 128
JOB_STORE_FILES = 15 * 3  # SQLAlchemy's pool (5 + 10 overflow), SQLite's database, -wal and -shm each
PROCESSING_FILES = 16  # a worker reads and writes one instance at a time; its send stage one association
OPEN_FILES_LIMIT = 1024  # LimitNOFILE in deploy/systemd, ulimits.nofile in deploy/compose.yaml


def open_files_needed(settings: Settings) -> int:
    """File descriptors the node may need at its caps: dicom.max_associations (C-STORE and STOW-RS)
    and max_pending_connections (a socket each), web.max_connections, the job store and processing,
    over a fixed base."""
    cap = settings.web.max_connections
    web = FILES_PER_HTTP_CONNECTION * cap + cap + HTTP_LISTEN_BACKLOG if settings.web.enabled else 0
    return (
        BASE_OPEN_FILES
        + FILES_PER_ASSOCIATION * settings.dicom.max_associations
        + settings.dicom.max_pending_connections
        + web
        + JOB_STORE_FILES
        + PROCESSING_FILES
    )


def open_files_warning(settings: Settings, soft_limit: int) -> str | None:
    """What to tell the operator when the process's open-files limit is below what the caps need."""
    needed = open_files_needed(settings)
    if soft_limit < 0 or soft_limit >= needed:  # negative: RLIM_INFINITY
        return None
    web = f", web.max_connections = {settings.web.max_connections}" if settings.web.enabled else ""
    return (
        f"the open-files limit is {soft_limit}, but dicom.max_associations = {settings.dicom.max_associations}, "
        f"max_pending_connections = {settings.dicom.max_pending_connections}{web} may need {needed}: raise "
        "LimitNOFILE (ulimits.nofile in compose) or lower the caps, else a flood of connections can break "
        "C-ECHO, C-STORE and the status page alike (README: Limits)"
    )
