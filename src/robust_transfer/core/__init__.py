"""Plumbing every layer uses: errors and input checks, devices and precision, seeded
noise, atomic writes, the per-sample store and the results format."""
