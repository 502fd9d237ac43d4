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


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(record, default=str, sort_keys=True) + "\n"
        with self._lock:
            # O_APPEND: lines from several processes (receiver, workers) never interleave mid-line.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
