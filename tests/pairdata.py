"""Small preference-pair files in the Pick-a-Pic v2 schema, written for tests (the writers live in
`diffalign.smoke`, shared with the GPU check)."""

from diffalign.smoke import CAPTIONS, pair_rows, png_bytes, write_parquet

__all__ = ["CAPTIONS", "pair_rows", "png_bytes", "write_parquet"]
