"""The estimator: cost model, simulator and profiles (torch-free)."""
