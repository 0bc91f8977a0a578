"""Kōrero benchmarks: ghz-format configs, a load tool writing ghz reports, scenarios."""
