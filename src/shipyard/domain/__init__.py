"""Domain models, names and state machines. Pure: no I/O, imports nothing of ours but errors."""
