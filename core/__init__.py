"""What the server, the engines and the tools share that is neither engine code nor gRPC: the
domain errors (errors.py) and the concurrency helpers (concurrency.py)."""
