"""The tuner: search spaces, screening by the estimator, and campaigns of real trials."""
