"""Executors: where admitted jobs run (``base.Executor``). ``shipyard.wiring`` picks one by URL."""
