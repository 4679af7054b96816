"""Quality of generated data against real data, per domain: digits (MNIST), conformers (molecules)."""
