"""Every name that crosses a process boundary: topics, channels, ports, environment variables."""

from typing import Final

# NSQ names. No dots: nsqd allows them, but they break statsd-style graphite paths.
DEFAULT_QUEUE: Final = "jobs"
RESULTS_TOPIC: Final = "results"
DEAD_LETTER_TOPIC: Final = "dead_letters"
WORKER_CHANNEL: Final = "workers"
GATEWAY_CHANNEL_PREFIX: Final = "gateway"
# The ledger's durable channel on the results and dead-letter topics: outcomes wait in nsqd for
# a ledger that is down, and are FINed only once recorded.
LEDGER_CHANNEL: Final = "ledger"
LEDGER_SQLITE_SCHEME: Final = "sqlite:///"
LEDGER_POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")
# Cancellations: the gateway publishes a cancelled job's id here; every worker reads it on its
# own ephemeral channel, skips the job if it arrives, and ends it if it runs in a child process.
CANCEL_TOPIC: Final = "cancels"
# Each worker process reads it on a channel of its own: prefix, worker id, random suffix.
CANCEL_CHANNEL_PREFIX: Final = "cancel"
EPHEMERAL_SUFFIX: Final = "#ephemeral"  # nsqd drops such a channel when its last client goes
# Started events (tasks with track_started): workers publish them, the ledger reads them on its
# durable channel and reports the job as running.
STARTED_TOPIC: Final = "started"

# Default ports of the local stack (each can be changed by its environment variable).
NSQD_TCP_PORT: Final = 4150
NSQD_HTTP_PORT: Final = 4151
LOOKUPD_HTTP_PORT: Final = 4161
GATEWAY_PORT: Final = 8080
WORKER_METRICS_PORT: Final = 9101
EXPORTER_PORT: Final = 9117

# Environment variables. The daemons' settings derive theirs from the field names in
# nsqjobs.config (NSQJOBS_ + FIELD); these are the ones read outside a config class.
ENV_PREFIX: Final = "NSQJOBS_"
ENV_KERNEL_IMPL: Final = "NSQJOBS_KERNEL_IMPL"
ENV_DEBUG_TASKS: Final = "NSQJOBS_DEBUG_TASKS"  # 1: add DEBUG_TASK_MODULE to the task modules
# A file the debug task ``debug.chaos`` appends each job's key to when it starts (the chaos
# suite counts executions there, independently of NSQ and the ledger).
ENV_DEBUG_EXECUTIONS_LOG: Final = "NSQJOBS_DEBUG_EXECUTIONS_LOG"
ENV_EVENT_LOOP: Final = "NSQJOBS_EVENT_LOOP"
ENV_GATEWAY_URL: Final = "NSQJOBS_GATEWAY_URL"
ENV_API_TOKEN: Final = "NSQJOBS_API_TOKEN"  # the bearer token `nsqjobs submit` sends
ENV_BIN_DIR: Final = "NSQJOBS_BIN_DIR"  # where make nsq puts the NSQ binaries (.bin/)
ENV_SUPERVISOR: Final = "SUPERVISOR_ENABLED"  # set by supervisord in the programs it runs

METRIC_PREFIX: Final = "nsqjobs"

# Task modules: the default one, and the debug tasks NSQJOBS_DEBUG_TASKS=1 adds to any list.
BUILTIN_TASK_MODULE: Final = "nsqjobs_tasks.builtin"
DEBUG_TASK_MODULE: Final = "nsqjobs_tasks.debug"

# The gateway's job submission routes (their 4xx are counted as rejected jobs).
SUBMIT_ROUTE: Final = "/v1/jobs"
BATCH_ROUTE: Final = "/v1/jobs/batch"

# The most jobs one listing page, or one bulk replay or purge, takes (?limit=).
MAX_PAGE_LIMIT: Final = 1000

# nsqd's default --max-body-size (the largest MPUB body), when nsqd cannot be asked.
NSQD_MAX_BODY_SIZE: Final = 5 * 1024 * 1024

# Wire limits.
WIRE_VERSION: Final = 1
MAX_JOB_ID_LENGTH: Final = 128
MAX_DELAY_MS: Final = 3_600_000  # nsqd's default --max-req-timeout; above it nsqd drops the conn
MAX_WAIT_SECONDS: Final = 60.0  # --max-wait-s's default
MAX_WAIT_LIMIT_S: Final = 3600.0  # the most --max-wait-s may be
MAX_EXPIRES_S: Final = 366 * 86400.0  # a year: any longer is a typo
# The longest delay the job ledger holds (delay_ms or run_at): a year, like MAX_EXPIRES_S.
MAX_LEDGER_DELAY_S: Final = 366 * 86400
MAX_BATCH_JOBS: Final = 1000
MAX_WAIT_IDS: Final = 1000  # ids one POST /v1/jobs/wait may wait for
# The outcomes a gateway remembers after they went by on the results topic, so that a wait that
# starts just after a result arrived still finds it (the only memory without a job ledger):
# the newest ones, for at most this long, this many, and this many bytes of result messages.
RECENT_RESULTS_S: Final = 60.0
RECENT_RESULTS_MAX: Final = 10_000
RECENT_RESULTS_BYTES: Final = 16 * 1024 * 1024

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

# nsqd buffers deliveries to a consumer up to a size or a time (pynsq asks 16 KiB or 250 ms),
# and flushes at once when the consumer's RDY is used up. 64 bytes (the least nsqd accepts) writes
# each message as it comes (any body over 94 bytes; smaller ones wait for the timeout): the
# gateway's results reader uses it, since ?wait= answers are latency. Workers ask for 16 KiB and
# --delivery-buffer-ms, and by default keep a lone message unbatched by RDY alone
# (nsqjobs.worker.flow); --delivery-buffer-ms 0 asks for 64 bytes instead.
READER_OUTPUT_BUFFER_BYTES: Final = 64
READER_OUTPUT_BUFFER_TIMEOUT_MS: Final = 25
WORKER_OUTPUT_BUFFER_BYTES: Final = 16 * 1024
