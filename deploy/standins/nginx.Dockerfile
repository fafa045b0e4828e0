# Stand-in for the official nginx image (nginx:1.27-alpine): Debian's nginx, run the same way
# (nginx in the foreground as root, workers as user nginx, /etc/nginx/nginx.conf) with busybox
# for wget, which the alpine image has.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx busybox \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && ln -s /bin/busybox /usr/local/bin/wget \
    && useradd --system --no-create-home --shell /usr/sbin/nologin nginx \
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
