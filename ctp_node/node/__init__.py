"""The network node: receive (C-STORE), spool, jobs and completion, the work and send stages, audit, metrics."""
