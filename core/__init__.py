"""What the server, the engines and the tools share that is neither engine code nor gRPC: the
domain errors (errors.py), concurrency helpers (concurrency.py), the settings read once from the
environment (settings.py) and the server process's own concerns (process.py)."""
