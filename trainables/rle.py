"""COCO's compressed RLE string (``segmentation.counts`` as text), read without decoding the mask:
pycocotools' ``rleFrString``, so that a string whose runs do not cover the image is refused before
training (pycocotools decodes it into arbitrary pixels, or loops, rather than failing)."""

from __future__ import annotations


def string_counts(counts: str | bytes) -> list[int] | None:
    """The run lengths a compressed RLE string holds (as pycocotools reads them: 5 bits per
    character from ``0`` (48) up, a continuation bit, a sign bit on the last, each run from the
    third on a delta to the run two before); None for text that is no such string."""
    text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                return None  # cut inside a number
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs
