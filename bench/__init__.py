"""Pipeline benchmarks of nsqjobs against bare NSQ baselines; run ``python -m bench``."""
