"""STAND-IN (helper A's branch only): the package marker; helper B's __init__.py replaces it."""
