"""Samplers that draw synthetic data from trained models, for models that need more than one call."""
