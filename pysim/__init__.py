"""pysim."""
