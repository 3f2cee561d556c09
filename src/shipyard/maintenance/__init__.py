"""Maintenance of a home: garbage collection of unreferenced blobs and stale temp files."""
