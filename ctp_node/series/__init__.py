"""The path of one series: assemble -> model grid -> inpaint -> source grid -> guardrail -> derived series.

Each stage is a plain function over plain data; ``pipeline`` runs a series through all of them."""

from ctp_node.series.ctp_series import CTPSeries

__all__ = ["CTPSeries"]
