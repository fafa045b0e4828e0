"""The worker: readers feed a job state machine that runs tasks, publishes results, and settles."""
