#!/usr/bin/env bash
# Build local stand-ins for the official images docker-compose.yml names, for machines that
# cannot pull from Docker Hub (tests and CI only; users get the real images).
#
#   debian:bookworm-slim -> nsqjobs-standin/debian:bookworm-slim  (debootstrap minbase, slimmed)
#   nsqio/nsq:v1.3.0     -> nsqjobs-standin/nsq:v1.3.0            (static NSQ v1.3.0 + busybox)
#   prom/prometheus      -> nsqjobs-standin/prometheus:2.42        (Debian's prometheus binary)
#   postgres:15-bookworm -> nsqjobs-standin/postgres:15            (Debian's postgresql package)
#   nginx:1.27-alpine    -> nsqjobs-standin/nginx:1.22             (Debian's nginx package)
#
# Each image is built only when missing (postgres and nginx also when their files changed). Needs root, debootstrap, busybox-static, Go, prometheus;
# the PostgreSQL and nginx stand-ins install their Debian packages with apt inside the build.
# docker-compose.yml is pointed at the stand-ins by the variables in standins.env (the tests
# export them; `set -a; . deploy/standins/standins.env; set +a` does it by hand).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=standins.env
source "$here/standins.env"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

have() { docker image inspect "$1" >/dev/null 2>&1; }

# The NSQ and Prometheus stand-ins have no libc: the busybox copied in (sh, wget for health
# checks) must be the static one (Debian's busybox-static), or their RUN steps fail obscurely.
static_busybox() {
  local bb
  bb="$(command -v busybox || true)"
  if [ -z "$bb" ] || ldd "$bb" >/dev/null 2>&1; then
    echo "standins: need a static busybox on PATH (apt-get install busybox-static)" >&2
    exit 1
  fi
  echo "$bb"
}

if ! have "$BASE_IMAGE"; then
  echo "standins: $BASE_IMAGE (debootstrap, ~1 min)"
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs="$work/rootfs"
  # Like the official slim image: no docs, man pages or locales.
  mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
  cp "$here/dpkg-slim.cfg" "$rootfs/etc/dpkg/dpkg.cfg.d/docker"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/usr/share/{doc,man,info}/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  # pip reaches PyPI from here only through the host's CA bundle; the real base needs none of it.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$rootfs/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/host-ca.crt"
    printf '[global]\ncert = /etc/ssl/certs/host-ca.crt\n' >"$rootfs/etc/pip.conf"
  fi
  tar -C "$rootfs" -c . | docker import \
    -c 'CMD ["bash"]' -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$BASE_IMAGE" >/dev/null
fi

if ! have "$NSQ_IMAGE"; then
  echo "standins: $NSQ_IMAGE (static NSQ build)"
  mkdir -p "$work/nsq/bin"
  for app in nsqd nsqlookupd nsqadmin nsq_tail nsq_stat to_nsq; do
    (cd "$root/deploy/nsq" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' \
      -o "$work/nsq/bin/" "github.com/nsqio/nsq/apps/$app")
  done
  cp "$(static_busybox)" "$work/nsq/bin/busybox"
  cp "$here/nsq.Dockerfile" "$work/nsq/Dockerfile"
  docker build -q -t "$NSQ_IMAGE" "$work/nsq" >/dev/null
fi

if ! have "$PROMETHEUS_IMAGE"; then
  echo "standins: $PROMETHEUS_IMAGE (Debian's prometheus)"
  mkdir -p "$work/prom"
  cp "$(command -v prometheus)" "$work/prom/prometheus"
  cp "$(static_busybox)" "$work/prom/busybox"
  cp "$here/prometheus.Dockerfile" "$work/prom/Dockerfile"
  docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$PROMETHEUS_IMAGE" "$work/prom" >/dev/null
fi

# Debian's packages installed in a container of the base stand-in (apt reaches the mirror there).
# Rebuilt when their files changed: the image carries a hash of them as a label.
for name in postgres nginx; do
  var="$(echo "$name" | tr a-z A-Z)_IMAGE"
  sum="$(cat "$here/$name".* | sha256sum | cut -c1-16)"
  label="$(docker image inspect -f '{{index .Config.Labels "nsqjobs.standin"}}' "${!var}" 2>/dev/null || true)"
  if [ "$label" != "$sum" ]; then
    echo "standins: ${!var} (Debian's ${name/postgres/postgresql} package)"
    docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" --label "nsqjobs.standin=$sum" \
      -f "$here/$name.Dockerfile" -t "${!var}" "$here" >/dev/null
  fi
done
