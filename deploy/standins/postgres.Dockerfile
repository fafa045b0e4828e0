# Stand-in for the official postgres image (postgres:15-bookworm): Debian's postgresql package,
# with the official image's data path, port, user and environment (see postgres.entrypoint.sh).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# No default cluster: the entrypoint creates one in PGDATA on the first start. The server's own
# binaries (initdb, pg_ctl, postgres, pg_isready, psql) are linked into /usr/local/bin, ahead of
# Debian's version-picking wrappers in /usr/bin.
RUN mkdir -p /etc/postgresql-common \
    && echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data \
    && ln -s /usr/lib/postgresql/*/bin/* /usr/local/bin/
COPY postgres.entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# Fast shutdown, as the official image: SIGTERM would wait for every client to disconnect.
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
