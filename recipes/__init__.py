"""Recipes: runnable scripts, each with a `main(cfg)` callable from tests."""
