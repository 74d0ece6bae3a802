"""orch worker: serves one stage of a model over gRPC."""
