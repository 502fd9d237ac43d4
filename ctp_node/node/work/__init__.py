"""What processes and sends: the worker, its process and send stages, and the transports out (C-STORE, STOW-RS).

Imports ``ctp_node.node.shared``, never ``ctp_node.node.receive`` (tests/test_import_contract.py).
"""
