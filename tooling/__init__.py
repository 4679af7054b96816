"""Tools around runs: reports, paper figures next to the published values, the local grid launcher."""
