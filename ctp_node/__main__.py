"""`python -m ctp_node` runs the CLI (for machines where the console script is not installed)."""

from ctp_node.cli.main import app

app()
