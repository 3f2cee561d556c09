"""Security baseline: path confinement, API tokens, the hash-chained audit log."""
