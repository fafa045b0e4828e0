"""nsqjobs compute tasks: task definitions (``nsqjobs_tasks.builtin``) and their kernels."""
