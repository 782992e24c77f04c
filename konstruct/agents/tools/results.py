"""A tool's result cut to what a prompt can hold, with a marker that says how much was cut."""

from __future__ import annotations


def _cut_marker(cut: int, total: int) -> str:
    return f"\n…[cut: {cut} of {total} chars]"


def truncate_result(text: str, limit: int = 4000) -> str:
    """`text` if it has at most `limit` chars, else its start plus a marker
    "\\n…[cut: N of M chars]" (N chars cut of M) so the whole is at most `limit`."""
    if limit < 0:
        raise ValueError("limit must not be negative")
    total = len(text)
    if total <= limit:
        return text
    if limit < len(_cut_marker(total, total)):
        return text[:limit]
    # The marker's length depends on how much is cut: keep the most text that fits.
    kept = limit - len(_cut_marker(total, total))
    while kept + 1 < total and kept + 1 + len(_cut_marker(total - kept - 1, total)) <= limit:
        kept += 1
    return text[:kept] + _cut_marker(total - kept, total)
