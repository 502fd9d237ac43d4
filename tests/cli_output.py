"""Command output as tests read it: Rich's panels and wrapping removed."""

from __future__ import annotations

import re

BOX_DRAWING = re.compile("[│╭╮╰╯─┃━┏┓┗┛┡┩]")


def flat(text: str) -> str:
    """``text`` as one line of words: box drawing (usage errors come in a panel) and line wrapping removed."""
    return " ".join(BOX_DRAWING.sub(" ", text).split())
