# Stand-in for nsqio/nsq:v1.3.0: the same static binaries in /usr/local/bin, linked from /, and
# busybox (sh, wget) as the official alpine image has.
FROM scratch
COPY bin/ /usr/local/bin/
RUN ["/usr/local/bin/busybox", "sh", "-c", "mkdir -p /bin /data /tmp && /usr/local/bin/busybox --install -s /bin && for f in /usr/local/bin/nsq*; do ln -s $f /; done"]
WORKDIR /data
