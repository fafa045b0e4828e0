"""nsqjobs against Celery, Dramatiq, RQ and IPython Parallel: ``python -m bench.peers``."""
