"""The network node, in three folders that show which way a series goes.

- ``receive/``: what takes series in. The DICOM SCP (``scp``), the handshake gate in front of it
  (``handshake``), the checks and durable spool write shared with STOW-RS (``ingest``), the receiving
  process (``receiver``: recording instances, completing quiet series) and C-GET from a PACS
  (``retrieve``).
- ``work/``: what processes and sends. The worker (``worker``) and its two stages (``process_stage``,
  ``send_stage``), the processor that runs the series pipeline (``series_processor``), the job's lease
  and progress (``lease``, ``progress``), and the transports out (``scu``: C-STORE and C-ECHO;
  ``stow_client``: STOW-RS).
- ``shared/``: what both sides use and neither owns. The job store (``jobs``: write side; ``jobs_read``:
  read side; ``job_tables``: the schema), the completion policy the store applies (``completeness``),
  the spool and results layouts (``spool``, ``results``), the retry policy (``retry``), the DICOM socket
  and a peer's address (``dicom_transport``, ``peer``), DICOM statuses, the audit trail, metrics and
  webhooks.

``receive`` and ``work`` import ``shared`` and never each other; ``shared`` imports neither
(tests/test_import_contract.py).
"""
