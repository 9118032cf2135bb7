"""Edits of a serialized SentencePiece model (a protobuf ModelProto), without a protobuf dependency:
the tokenizer's variants of one model (no dummy prefix; special tokens spelled as text) are the
model's bytes, appended to or rewritten in place, loaded as new SentencePieceProcessors."""
from __future__ import annotations

from typing import Iterator

# A serialized ModelProto may repeat a field: the parser merges the copies, later values winning.
# Appending `normalizer_spec { add_dummy_prefix: false }` (field 3, length 2; inner field 3 = 0)
# therefore yields the same model minus the dummy prefix.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint that starts at data[i] -> (its value, the index after it)."""
    value = shift = 0
    while True:  # 7 bits a byte, least significant first; a byte below 0x80 is the last
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) of each field of the protobuf message data[start:end];
    a length-delimited value (a string, a sub-message) is its bytes without the length."""
    i = start
    while i < end:
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            j = _varint(data, i)[1]
        elif wire == 2:
            n, i = _varint(data, i)
            j = i + n
        elif wire in (1, 5):  # fixed 64 / 32 bits
            j = i + (8 if wire == 1 else 4)
        else:  # groups (3, 4): not in sentencepiece's schema
            raise ValueError(f"not a SentencePiece model: protobuf wire type {wire} at byte {i}")
        yield key >> 3, i, j
        i = j


def user_defined_as_unused(proto: bytes) -> bytes:
    """The model with its USER_DEFINED pieces (the special tokens) typed UNUSED: SentencePiece no
    longer matches their text as one piece, and never emits an unused piece, so the text is spelled
    with the others, as if the special tokens were not in the vocabulary. ModelProto's pieces are
    its field 1; a piece's type is field 3, a one-byte varint (USER_DEFINED 4, UNUSED 5) that is
    rewritten in place, every length unchanged."""
    out = bytearray(proto)
    for field, start, end in _fields(proto, 0, len(proto)):
        if field == 1:
            for f, s, e in _fields(proto, start, end):
                if f == 3 and proto[s:e] == b"\x04":
                    out[s] = 5
    return bytes(out)
