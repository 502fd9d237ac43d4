"""The STOW-RS Warning header (ctp_node/web/stow.py): whole words, nothing meant for pydicom's caller."""

from __future__ import annotations

import io
import re

import pytest
from pydicom.filereader import read_partial

from ctp_node.web.stow import WARNING_CHARS, _warning


def _quoted(header: str) -> str:
    match = re.fullmatch(r'299 ctp-node "(.*)"', header)
    assert match, header
    return match.group(1)


def test_pydicoms_advice_to_its_caller_is_not_passed_on():
    with pytest.raises(Exception) as caught:  # what the node's reader meets in a part that is not DICOM
        read_partial(io.BytesIO(b"not a DICOM file at all" * 10))
    assert "force=True" in str(caught.value)
    text = _quoted(_warning(f"not a DICOM Part 10 file (preamble, DICM, file meta): {caught.value}"))
    assert "force" not in text
    assert text.startswith("not a DICOM Part 10 file") and text.endswith(("header.", "..."))


def test_a_long_reason_is_cut_after_a_whole_word():
    words = "the instance of series 1.2.826.0.1.3680043.8.498.1 could not be stored because " * 5
    text = _quoted(_warning(words))
    assert len(text) <= WARNING_CHARS and text.endswith("...")
    assert words.startswith(text[:-3]) and words[len(text) - 3] == " "  # the cut falls between words


def test_a_short_reason_is_kept_as_it_is_made_safe():
    assert _warning('bad "quote" \\ and é') == '299 ctp-node "bad \\"quote\\" \\\\ and ?"'
