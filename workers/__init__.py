"""nsqjobs compute tasks: task definitions (``workers.tasks``) and their kernels."""
