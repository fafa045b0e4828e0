# nsqjobs: one image for every daemon (gateway, worker, exporter); the command picks the daemon.
#   docker build -t nsqjobs .          (BASE_IMAGE: any Debian-like image with apt and python3)
ARG BASE_IMAGE=debian:bookworm-slim

# Build stage: a C compiler and the Python headers build the Cython kernels into a virtualenv.
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Debian's pip 23.0 would install pynsq through the deprecated setup.py path: upgrade it first.
RUN python3 -m venv /opt/nsqjobs && /opt/nsqjobs/bin/pip install --no-cache-dir --upgrade pip
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY service service
COPY workers workers
RUN /opt/nsqjobs/bin/pip install --no-cache-dir . \
    && find /opt/nsqjobs -name '__pycache__' -prune -exec rm -rf {} + \
    && rm -rf /opt/nsqjobs/lib/python3*/site-packages/pip
# From /, so the check imports the installed package (with its compiled kernel), not /src.
RUN cd / && /opt/nsqjobs/bin/python -c "import nsqjobs_tasks.kernels._primes_cy, nsqjobs.cli"

# Runtime stage: Debian's python3 and the virtualenv, nothing else.
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/nsqjobs --create-home nsqjobs
COPY --from=build /opt/nsqjobs /opt/nsqjobs
ENV PATH=/opt/nsqjobs/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/lib/nsqjobs/numba-cache \
    NSQJOBS_GATEWAY_HOST=0.0.0.0 \
    NSQJOBS_WORKER_HOST=0.0.0.0 \
    NSQJOBS_EXPORTER_HOST=0.0.0.0
USER nsqjobs
WORKDIR /var/lib/nsqjobs
EXPOSE 8080 9101 9117
# Checks the gateway on NSQJOBS_GATEWAY_PORT by default; docker-compose.yml sets one per daemon.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["nsqjobs", "check"]
ENTRYPOINT ["nsqjobs"]
CMD ["gateway"]
