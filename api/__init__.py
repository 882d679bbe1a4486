"""Conch control plane: files, fine-tuning jobs, models and deployments over an OpenAI-compatible REST API."""
