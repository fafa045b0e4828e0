"""The nsqd exporter: nsqd topic and channel stats as Prometheus metrics, read on scrape."""
