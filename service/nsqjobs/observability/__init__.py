"""Metric instruments, their exposition (/metrics, /healthz, /readyz), the worker metrics hook."""
