"""Content-addressed blob store (BLAKE3) over fsspec."""

from shipyard.blobs.store import BlobStore, PutResult, hash_bytes, hash_file, open_blobs

__all__ = ["BlobStore", "PutResult", "hash_bytes", "hash_file", "open_blobs"]
