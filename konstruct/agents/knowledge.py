"""Pure helpers of the knowledge base: Markdown or plain text cut into chunks.

No I/O. The store (`konstruct.agents.store.knowledge`) embeds and keeps the chunks.

A chunk is at most `max_chars` long and never empty. Text is cut on headings
and blank lines; a heading stays with (the start of) its section, and small
sections share a chunk. Only a paragraph longer than a chunk is cut inside,
at a sentence end or a space where there is one, and then its pieces overlap
by about `overlap` characters so that no sentence is only ever seen cut in two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
# Where a long paragraph is best cut: after a sentence, else at a space.
_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s+|\n")
_SPACE = re.compile(r"\s+")


@dataclass
class _Section:
    heading: str | None = None
    paragraphs: list[str] = field(default_factory=list)


def _blocks(text: str) -> list[tuple[bool, str]]:
    """(is_heading, text) of each heading line and each paragraph, in order.

    A paragraph ends at a blank line or a heading; a fenced code block is one
    paragraph (its blank lines and `#` lines are its own).
    """
    blocks: list[tuple[bool, str]] = []
    lines: list[str] = []
    fence: str | None = None

    def end_paragraph() -> None:
        body = "\n".join(lines).strip("\n")
        if body.strip():
            blocks.append((False, body.rstrip()))
        lines.clear()

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        opening = _FENCE.match(line)
        if fence is not None:
            lines.append(line)
            if opening and opening.group(1) == fence:
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            lines.append(line)
        elif not line.strip():
            end_paragraph()
        elif _HEADING.match(line):
            end_paragraph()
            blocks.append((True, line.strip()))
        else:
            lines.append(line)
    end_paragraph()
    return blocks


def _sections(text: str) -> list[_Section]:
    """Paragraphs grouped under their heading; headings with nothing between
    them (`# A` then `## B`) form one heading."""
    sections: list[_Section] = []
    for is_heading, body in _blocks(text):
        current = sections[-1] if sections else None
        if is_heading:
            if current is not None and current.heading is not None and not current.paragraphs:
                current.heading += "\n\n" + body
            else:
                sections.append(_Section(heading=body))
        elif current is None:
            sections.append(_Section(paragraphs=[body]))
        else:
            current.paragraphs.append(body)
    return sections


def _cut_at(text: str, start: int, end: int) -> int:
    """Where to end a piece of `text[start:]` that must end by `end`."""
    if end >= len(text):
        return len(text)
    window = text[start:end]
    # Not before the middle of the window, so pieces do not get tiny.
    least = len(window) // 2
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() > least]
    if ends:
        return start + ends[-1]
    spaces = [m.start() for m in _SPACE.finditer(window) if m.start() > least]
    if spaces:
        return start + spaces[-1]
    return end


def _split_long(text: str, max_chars: int, overlap: int, first: int) -> list[str]:
    """`text` in pieces of at most `max_chars` (the first at most `first`), each
    starting about `overlap` characters before the end of the one before it."""
    pieces: list[str] = []
    start = 0
    budget = first
    while start < len(text):
        cut = _cut_at(text, start, start + budget)
        piece = text[start:cut].strip()
        if piece:
            pieces.append(piece)
        if cut >= len(text):
            break
        # Back up by `overlap`, then forward to the start of a word.
        back = max(cut - overlap, start + 1)
        space = _SPACE.search(text, back, cut)
        start = space.end() if space is not None and space.end() < cut else back
        budget = max_chars
    return pieces


def chunk_text(text: str, max_chars: int = 1200, overlap: int = 150) -> list[str]:
    """Markdown or plain text as chunks of at most `max_chars`, none empty (see module)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, not {max_chars}")
    if not 0 <= overlap < max_chars:
        raise ValueError(f"overlap must be at least 0 and below max_chars, not {overlap}")
    chunks: list[str] = []
    current: list[str] = []

    def size(parts: list[str]) -> int:
        return sum(len(p) for p in parts) + 2 * max(len(parts) - 1, 0)

    def fits(part: str) -> bool:
        return size([*current, part]) <= max_chars

    def flush() -> None:
        if current:
            chunks.append("\n\n".join(current))
            current.clear()

    def add_long(paragraph: str, heading: str | None) -> None:
        """A paragraph longer than a chunk: cut, its heading on the first piece."""
        flush()
        first = max_chars
        if heading is not None:
            first = max_chars - len(heading) - 2
            if first < max_chars // 4:  # a heading too long to share a chunk
                chunks.extend(_split_long(heading, max_chars, overlap, max_chars))
                heading, first = None, max_chars
        pieces = _split_long(paragraph, max_chars, overlap, first)
        if heading is not None:
            pieces[0] = f"{heading}\n\n{pieces[0]}"
        chunks.extend(pieces[:-1])
        current.append(pieces[-1])

    for section in _sections(text):
        parts = ([section.heading] if section.heading else []) + section.paragraphs
        whole = "\n\n".join(parts)
        if fits(whole):
            current.append(whole)
            continue
        flush()
        if len(whole) <= max_chars:
            current.append(whole)
            continue
        # The section needs more than one chunk: its heading goes with its first paragraph.
        heading = section.heading
        if not section.paragraphs:
            add_long(whole, None)
            continue
        for paragraph in section.paragraphs:
            unit = f"{heading}\n\n{paragraph}" if heading is not None else paragraph
            if fits(unit):
                current.append(unit)
            elif len(unit) <= max_chars:
                flush()
                current.append(unit)
            else:
                add_long(paragraph, heading)
            heading = None
    flush()
    return [c for c in chunks if c.strip()]


def first_heading(text: str) -> str | None:
    """The text of the first Markdown heading (`# Title`), outside code blocks."""
    for is_heading, body in _blocks(text):
        if is_heading:
            match = _HEADING.match(body)
            if match and match.group(2).strip():
                return match.group(2).strip()
    return None
