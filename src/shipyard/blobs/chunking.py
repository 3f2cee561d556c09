"""Content-defined chunking for large blobs (FastCDC, through the ``fastcdc`` package's compiled
chunker).

A large file is cut where a rolling hash of its content says so, not at fixed offsets, so an edit
moves only the boundaries near it: changing 1 MiB in the middle of a 1 GiB file changes a few
chunks (about 256 KiB each) and leaves every other chunk, already stored, as it was. The blob of
the whole file keeps its name (the BLAKE3 of its whole content); it is stored as a *recipe*, the
ordered list of its chunks' digests and lengths, and every chunk is a blob of its own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from fastcdc.fastcdc_cy import fastcdc_cy

CHUNKED_MIN_BYTES = 8 * 1024 * 1024
"""Files at least this large are chunked; smaller ones are stored whole (loose or packed)."""
CDC_MIN = 128 * 1024
CDC_AVG = 256 * 1024
CDC_MAX = 1024 * 1024
RECIPE_ENTRY = struct.Struct("<32sQ")


def chunk_spans(data: memoryview) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each content-defined chunk of ``data``, in order."""
    for chunk in fastcdc_cy(data, CDC_MIN, CDC_AVG, CDC_MAX, False, None):
        yield chunk.offset, chunk.length


def recipe_bytes(chunks: list[tuple[str, int]]) -> bytes:
    """The recipe of a chunked blob: its chunks' ``(digest, length)`` in order."""
    return b"".join(RECIPE_ENTRY.pack(bytes.fromhex(d), n) for d, n in chunks)


def parse_recipe(data: bytes) -> list[tuple[str, int]]:
    if len(data) % RECIPE_ENTRY.size:
        raise ValueError("a chunk recipe's length is not a multiple of its entry size")
    return [(digest.hex(), length) for digest, length in RECIPE_ENTRY.iter_unpack(data)]
