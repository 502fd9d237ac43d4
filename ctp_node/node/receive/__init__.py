"""What takes series in: DICOM C-STORE (and C-GET), the handshake gate, ingest into the spool, the receiving process.

Imports ``ctp_node.node.shared``, never ``ctp_node.node.work`` (tests/test_import_contract.py).
"""
