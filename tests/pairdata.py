"""Small preference-pair files in the Pick-a-Pic v2 schema, written for tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle on a gray background"]


def png_bytes(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_rows(n: int, labels=None, corrupt_rows=()) -> dict[str, list]:
    labels = labels or [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    rows = {
        "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
        "jpg_0": [png_bytes(2 * i) for i in range(n)],
        "jpg_1": [png_bytes(2 * i + 1) for i in range(n)],
        "label_0": list(labels),
    }
    for i in corrupt_rows:
        rows["jpg_1"][i] = b"not an image"
    return rows


def write_parquet(path: Path, n: int = 8, **kwargs) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(pair_rows(n, **kwargs)), path)
    return path
