"""The `ctp-node` command line: one module per verb, joined in `main`."""
