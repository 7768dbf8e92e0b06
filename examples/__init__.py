"""Example workloads for the pool."""
