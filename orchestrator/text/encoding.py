"""Text as UTF-8 bytes for llama.cpp, or a typed error naming the first character that is
not UTF-8."""

from __future__ import annotations

from orchcore.errors import InvalidInputError


class TextEncodingError(InvalidInputError):
    """Text that is not valid UTF-8 (a terminal in another encoding, a bad JSON string)."""


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, or a typed error naming the first byte that is not UTF-8.

    Command-line arguments that are not UTF-8 reach Python as lone surrogates
    (``\udce9`` for the byte 0xe9); JSON can carry them too.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        code = ord(char) - 0xDC00 if 0xDC80 <= ord(char) <= 0xDCFF else None
        what = f"the byte {code:#04x}" if code is not None else f"{char!r}"
        raise TextEncodingError(f"the text is not valid UTF-8 ({what} at character "
                                f"{exc.start}); check your terminal's character encoding"
                                ) from None
