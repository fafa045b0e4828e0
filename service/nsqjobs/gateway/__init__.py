"""The gateway: HTTP job submissions in, envelopes published to nsqd, results waited for."""
