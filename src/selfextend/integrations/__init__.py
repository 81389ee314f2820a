"""Model-library integrations (transformers attention registry)."""
