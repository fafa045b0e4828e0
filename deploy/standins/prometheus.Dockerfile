# Stand-in for prom/prometheus: Debian's binary laid out like the official image.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY prometheus /bin/prometheus
COPY busybox /bin/busybox
RUN ln -s /bin/busybox /bin/wget && mkdir -p /etc/prometheus /prometheus \
    && chown -R nobody:nogroup /etc/prometheus /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
