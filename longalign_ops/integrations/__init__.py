"""Integrations with training frameworks (transformers)."""
