"""Shared runtime of the recipes: run directories, results, CLI helpers, reports."""
