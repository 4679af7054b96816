"""Lightning models, one file per model family."""
