"""orch's orchestrator: plans a model across workers, deploys it, drives generation."""
