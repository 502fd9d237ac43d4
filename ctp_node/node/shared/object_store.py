"""An S3-compatible object store (boto3): the few operations the spool and the results need.

Every failure to reach the store (refused or dropped connection, timeout, a 5xx answer, throttling)
is :class:`StoreUnavailable`, a transient fault: the receiver answers 0xA700 and marks the store down
(``ctp_node.node.shared.health``), a worker's attempt is retried. What only a person can fix (a bucket
that does not exist, credentials the store refuses) is ``ConfigError`` naming the setting, raised by
:meth:`ObjectStore.check` when the node starts.

A PUT counts as stored when the store answered it with 200: S3's contract is that the object is then
durable (the rule the local spool keeps with fsync). The bytes go with a Content-MD5 the store checks,
so an object damaged on the way is refused rather than stored.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from ctp_node.config import ObjectStoreSettings
from ctp_node.errors import ConfigError, TransientError

log = logging.getLogger(__name__)

URI_SCHEME = "s3://"
# Answers that say "not now" rather than "never": the store is down, overloaded or throttling.
_UNAVAILABLE_CODES = frozenset({"500", "502", "503", "504", "SlowDown", "ServiceUnavailable", "InternalError"})


class StoreUnavailable(TransientError):
    """The object store cannot be reached or does not answer now (try again later)."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: datetime


def _credentials(settings: ObjectStoreSettings) -> dict[str, Any]:
    """boto3 session arguments for the configured credentials; ConfigError naming the key that cannot be read."""
    if settings.access_key_id is not None and settings.secret_access_key is not None:
        values = {}
        for name, credential in (("access_key_id", settings.access_key_id),
                                 ("secret_access_key", settings.secret_access_key)):  # fmt: skip
            try:
                values[name] = credential.read()
            except ConfigError as exc:
                raise ConfigError(f"storage.object_store.{name}: {exc}") from exc
        return {"aws_access_key_id": values["access_key_id"], "aws_secret_access_key": values["secret_access_key"]}
    if settings.credentials_file is not None:
        import configparser

        parser = configparser.ConfigParser()
        profile = settings.profile or "default"
        try:
            with open(settings.credentials_file, encoding="utf-8") as fh:
                parser.read_file(fh)
        except (OSError, configparser.Error) as exc:
            where = settings.credentials_file
            raise ConfigError(f"storage.object_store.credentials_file: cannot read {where}: {exc}") from exc
        section = parser[profile] if parser.has_section(profile) else {}
        key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
        if not key or not secret:
            raise ConfigError(
                f"storage.object_store.credentials_file: {settings.credentials_file} has no [{profile}] section with "
                "aws_access_key_id and aws_secret_access_key"
            )
        return {"aws_access_key_id": key.strip(), "aws_secret_access_key": secret.strip()}
    return {}  # boto3's chain: AWS_* variables, web identity, instance role


def is_uri(text: str | None) -> bool:
    return bool(text) and str(text).startswith(URI_SCHEME)


class ObjectStore:
    """One bucket (under ``prefix``) of an S3-compatible store; thread-safe (boto3 clients are)."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        self.bucket, self.prefix = settings.bucket, settings.prefix
        session = boto3.session.Session(region_name=settings.region, **_credentials(settings))
        config = Config(
            connect_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            # Two tries at most: a C-STORE sender waits for the answer, and a store that is down should be
            # refused quickly (0xA700: the sender retries later) rather than retried here for long.
            retries={"total_max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"},  # works with every S3-compatible store, and any bucket name
            # botocore's default CRC32 trailer (aws-chunked) costs more than an MD5 over 0.5 MB, and not
            # every S3-compatible store checks it; Content-MD5 (below) is checked by all of them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,  # one per association sending at once (dicom.max_associations)
        )
        if settings.ca_certificates is not None and not settings.ca_certificates.is_file():
            raise ConfigError(f"storage.object_store.ca_certificates: {settings.ca_certificates} is not a file")
        verify: bool | str = str(settings.ca_certificates) if settings.ca_certificates is not None else True
        self.client = session.client("s3", endpoint_url=settings.endpoint, config=config, verify=verify)

    # --- keys and addresses ------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def uri(self, key: str) -> str:
        """``s3://bucket/key``: how a location in the store is written into the job store."""
        return f"{URI_SCHEME}{self.bucket}/{key}"

    def key_of(self, uri: str) -> str:
        """The key of one of this bucket's ``s3://`` addresses; ValueError for another bucket's."""
        head = f"{URI_SCHEME}{self.bucket}/"
        if not uri.startswith(head):
            raise ValueError(f"{uri} is not in the configured bucket {self.bucket}")
        return uri[len(head) :]

    # --- operations --------------------------------------------------------------------------------

    def check(self) -> None:
        """At start: the bucket exists and the credentials are accepted; ConfigError naming the key that
        is wrong, StoreUnavailable when the store does not answer (the node starts and refuses meanwhile)."""
        from botocore.exceptions import ClientError, SSLError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket"):
                raise ConfigError(
                    f"storage.object_store.bucket: the bucket {self.bucket!r} does not exist at "
                    f"{self.settings.endpoint} (create it first)"
                ) from exc
            if code in ("403", "401", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status in (
                401,
                403,
            ):
                raise ConfigError(
                    "storage.object_store.secret_access_key: the object store refused the credentials for bucket "
                    f"{self.bucket!r} ({code or status}); check access_key_id/secret_access_key (or "
                    "credentials_file)"
                ) from exc
            raise self._unavailable("HEAD bucket", exc) from exc
        except SSLError as exc:  # a certificate this node does not trust: no retry will change that
            raise ConfigError(
                f"storage.object_store.ca_certificates: the TLS certificate of {self.settings.endpoint} is not "
                f"trusted ({exc}); give the CA bundle that signed it"
            ) from exc
        except Exception as exc:
            raise self._unavailable("HEAD bucket", exc) from exc

    def probe(self) -> None:
        """StoreUnavailable unless the bucket answers now (the health check)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._unavailable("HEAD bucket", exc) from exc

    def put(self, key: str, data: bytes | Sequence[bytes | memoryview] | Path) -> None:
        """Store one object; returns once the store confirmed it (StoreUnavailable otherwise).
        ``data``: bytes, pieces to send one after the other, or a file to send."""
        if isinstance(data, Path):
            with open(data, "rb") as fh:
                body: Any = fh
                digest = _md5_of_file(fh)
                fh.seek(0)
                self._put(key, body, digest)
            return
        pieces = (data,) if isinstance(data, bytes | bytearray) else tuple(data)
        md5 = hashlib.md5(usedforsecurity=False)
        for piece in pieces:
            md5.update(piece)
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._put(key, BytesIO(body) if isinstance(body, memoryview) else body, md5.digest())

    def _put(self, key: str, body: Any, digest: bytes) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentMD5=base64.b64encode(digest).decode("ascii")
            )
        except Exception as exc:
            raise self._unavailable(f"PUT {key}", exc) from exc

    def download(self, key: str, target: Path) -> Path:
        """One object into ``target`` (its folder must exist)."""
        try:
            self.client.download_file(self.bucket, key, str(target))
        except Exception as exc:
            raise self._unavailable(f"GET {key}", exc) from exc
        return target

    def get(self, key: str, *, first_bytes: int | None = None, max_bytes: int) -> bytes:
        """One object's bytes, or only its first ``first_bytes`` (a ranged GET); at most ``max_bytes`` +
        1 are read, so that a caller can tell an object over its limit (it checks the length)."""
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if first_bytes is not None:
            arguments["Range"] = f"bytes=0-{max(int(first_bytes), 1) - 1}"
        try:
            answer = self.client.get_object(**arguments)
            with contextlib.closing(answer["Body"]) as body:
                return body.read(max_bytes + 1)
        except Exception as exc:
            raise self._unavailable(f"GET {key}", exc) from exc

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under ``prefix`` (a full key prefix), in key order."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    yield StoredObject(item["Key"], int(item.get("Size", 0)), item["LastModified"])
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise self._unavailable(f"LIST {prefix}", exc) from exc

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (an earlier attempt's result); how many there were."""
        keys = [o.key for o in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except Exception as exc:
                raise self._unavailable(f"DELETE {prefix}", exc) from exc
        return len(keys)

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            reason = f"{code}: {exc.response.get('Error', {}).get('Message', '')}".strip(": ")
            if code not in _UNAVAILABLE_CODES:
                reason = f"refused ({reason})"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return StoreUnavailable(f"object store {self.settings.endpoint} bucket {self.bucket}: {what}: {reason}")


def _md5_of_file(fh: Any) -> bytes:
    md5 = hashlib.md5(usedforsecurity=False)
    while chunk := fh.read(1 << 20):
        md5.update(chunk)
    return md5.digest()
