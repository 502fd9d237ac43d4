"""The node's one configuration: a TOML file, every key overridable by an environment variable.

Precedence (highest first): environment (``CTP_NODE_<SECTION>__<KEY>``, e.g.
``CTP_NODE_DICOM__PORT=11113``), the TOML file (``--config`` or ``CTP_NODE_CONFIG``), embedded
defaults. Defaults need no external service: a SQLite job store and a spool under one data folder.
Each part of the node receives only the section it needs.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable characters, no backslash
CONFIG_ENV = "CTP_NODE_CONFIG"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


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
    # How long an association's reactor sleeps when it finds nothing to do (pynetdicom's default
    # is 1 ms, on the path of every PDU). Lower is faster ingest, at a cost while an association is
    # open and idle: about 15 % of a core at 0.2 ms, 6 % at 1 ms (measured on the 2-core dev VM).
    poll_interval_ms: float = Field(0.2, ge=0.01, le=100)
    allowed_callers: tuple[AllowedCaller, ...] = ()  # empty: any calling AE title is accepted
    tls: TLSSettings | None = None

    _check_ae = field_validator("ae_title")(_ae_title)


class SeriesSettings(Section):
    """When a received series is queued (``ctp_node.node.completeness`` judges whether it looks whole)."""

    quiet_period_s: float = Field(60, gt=0, description="A series is complete after this long without a new instance")
    # A series whose slice positions all hold the same number of instances (and no volume lacks a
    # slice) is queued after this shorter wait (never longer than quiet_period_s); not one that was
    # re-opened by a late instance.
    complete_quiet_period_s: float = Field(10, gt=0)
    # A series that looks incomplete waits this long (never shorter than quiet_period_s) without a
    # new instance for the rest, then is queued anyway with a warning on the job and in the log.
    incomplete_wait_s: float = Field(600, gt=0)
    min_time_points: int = Field(3, ge=2)


DEFAULT_DATA_DIR = Path("/var/lib/ctp-node")


class StorageSettings(Section):
    # Absolute, so that where patient data lands never depends on the folder the node was started
    # from; the systemd units and the container use this folder too.
    data_dir: Path = DEFAULT_DATA_DIR

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


class JobSettings(Section):
    database_url: str | None = None  # None: SQLite file in the data folder
    lease_s: float = Field(300, gt=0)
    heartbeat_s: float = Field(30, gt=0)
    max_attempts: int = Field(3, ge=1)

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

    @model_validator(mode="after")
    def _edges_ordered(self) -> GuardrailSettings:
        low, high = self.class_edges_hu
        if not low < high:
            raise ValueError(f"class_edges_hu must be increasing, got {self.class_edges_hu}")
        return self


class Destination(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str

    _check_ae = field_validator("ae_title")(_ae_title)


class SendSettings(Section):
    max_attempts: int = Field(6, ge=1)
    initial_backoff_s: float = Field(30, gt=0)
    backoff_multiplier: float = Field(2, ge=1)
    max_backoff_s: float = Field(1800, gt=0)


class OutputSettings(Section):
    series_number_offset: int = Field(1000, ge=0, description="Derived SeriesNumber = source + offset")
    series_description: str = Field("1s SYNTHETIC - RESEARCH USE ONLY", max_length=64)


class MetricsSettings(Section):
    port: int | None = Field(None, ge=1, le=65535)  # None: no Prometheus endpoint
    bind_address: str = "127.0.0.1"


class Settings(BaseSettings):
    """Everything the node reads at start; validated once, then passed down section by section."""

    model_config = SettingsConfigDict(env_prefix="CTP_NODE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    dicom: DicomSettings = DicomSettings()
    series: SeriesSettings = SeriesSettings()
    storage: StorageSettings = StorageSettings()
    jobs: JobSettings = JobSettings()
    model: ModelSettings = ModelSettings()
    guardrail: GuardrailSettings = GuardrailSettings()
    destinations: tuple[Destination, ...] = ()
    send: SendSettings = SendSettings()
    output: OutputSettings = OutputSettings()
    metrics: MetricsSettings = MetricsSettings()

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
    except ValueError as exc:
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}:\n{exc}") from exc


@functools.lru_cache(maxsize=4)
def get_settings(path: str | None = None) -> Settings:
    """The validated settings, read once per process (never at import time)."""
    return load_settings(path)
