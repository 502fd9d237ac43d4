"""What the receiving and the working side share: job store, spool and results layouts, retry policy, transport.

Imports neither ``ctp_node.node.receive`` nor ``ctp_node.node.work`` (tests/test_import_contract.py).
"""
