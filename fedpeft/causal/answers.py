"""The final number of a GSM8K-style answer, normalised so that exact match compares values."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
MARKER = "####"


def final_number(text: str) -> str | None:
    """The first number after the last `####`, else the last number in `text`; None if none.

    Commas, dollar signs and trailing decimal zeros are dropped, so "$1,200.00" equals "1200".
    """
    if MARKER in text:
        found = _NUMBER.findall(text.rsplit(MARKER, 1)[1])[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    number = found[0].replace(",", "").replace("$", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number == "-0" else number
