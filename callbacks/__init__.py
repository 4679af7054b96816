"""Small single-purpose Lightning callbacks."""
