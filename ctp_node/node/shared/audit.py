"""The audit trail: one JSON line per instance received and per series sent, append-only.

Kept apart from the logs (which rotate and carry debugging detail) so that "what came in and what
went out" can be answered for any series later. Identifiers only: UIDs, AE titles, hosts, counts;
no patient names.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ctp_node.permissions import make_dirs, open_new_file


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        make_dirs(self.path.parent)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        self.write_many(event, [fields])

    def write_many(self, event: str, records: list[dict[str, Any]]) -> None:
        """One line per record, appended with a single write (one system call for a whole batch).

        A record's own ``time`` (e.g. when an instance arrived) replaces the time of writing."""
        if not records:
            return
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        lines = "".join(
            json.dumps({"time": stamp, "event": event, **fields}, default=str, sort_keys=True) + "\n"
            for fields in records
        )
        with self._lock:
            # O_APPEND: lines from several processes (receiver, workers) never interleave mid-line.
            fd = open_new_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # 0640 whatever the umask
            try:
                data = memoryview(lines.encode())
                while data:  # a regular file takes it in one write; loop only for the rare short write
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
