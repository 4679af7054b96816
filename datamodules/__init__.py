"""Data: workflows (which examples train each generation), the generation store, real and synthetic data modules."""
