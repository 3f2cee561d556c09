"""The data plane: versioned, content-addressed datasets (``datasets``)."""
