"""Builders of tiny, deterministic, random-weight models for the demo, the tests and the CPU benchmarks.

Not needed for patching real models; nothing here downloads anything.
"""
