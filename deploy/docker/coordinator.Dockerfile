# The polyarch coordinator, built by the farm itself for linux/amd64 and linux/arm64 (README:
# "The coordinator and agent images"); what deploy/compose and deploy/kubernetes run. BASE is
# deploy/docker/python-base.sh's image. The context holds wheels/ (`polyarch wheelhouse` for
# every target arch, side by side, as for cli.Dockerfile) and probes/ (a copy of
# deploy/kubernetes/probes).
ARG BASE
FROM ${BASE}
# The wheelhouse is bind-mounted, never copied, and pip runs from its own wheel: no wheel, no
# pip and no python3-venv in the image. The user's fixed uid (10001) is the one the
# Kubernetes StatefulSet runs as; /var/lib/polyarch is its own, so a new named volume or PVC
# mounted there starts owned by it and the coordinator can make its 0700 data dir below. So
# is /var/lib/polyarch-contexts, where deploy/compose/compose.ha.yaml mounts the contexts
# volume its two coordinators share.
RUN --mount=type=bind,source=wheels,target=/wheels \
    set -- /wheels/pip-*.whl \
    && python3 -m venv --without-pip /opt/polyarch \
    && /opt/polyarch/bin/python "$1/pip" install --no-index --find-links /wheels \
        --no-cache-dir --disable-pip-version-check --no-warn-script-location polyarch \
    && /opt/polyarch/bin/polyarch --version \
    && groupadd --system --gid 10001 polyarch \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/polyarch --no-create-home \
        --shell /usr/sbin/nologin polyarch \
    && install -d -o 10001 -g 10001 -m 0755 /var/lib/polyarch /var/lib/polyarch-contexts
# The same probe file compose and Kubernetes mount at this path.
COPY probes/coordinator_health.py /etc/polyarch-probes/coordinator_health.py
ENV PATH=/opt/polyarch/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title="polyarch-coordinator" \
      org.opencontainers.image.description="polyarch coordinator: a build farm's queue, CA and tokens"
# Numeric, so Kubernetes' runAsNonRoot can check it without a runAsUser.
USER 10001:10001
VOLUME ["/var/lib/polyarch"]
# Clients (TLS + tokens), agents (mutual TLS), Prometheus metrics (plain HTTP).
EXPOSE 7600 7601 9600
# The gRPC health service over TLS, verified against the coordinator's own CA, as the
# Kubernetes probes and compose's healthcheck ask it. Docker keeps HEALTHCHECK in the image
# config; an OCI-format build (buildah agents) drops it, and compose and Kubernetes set their
# own. The first start makes the CA, hence the start period.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/opt/polyarch/bin/python", "/etc/polyarch-probes/coordinator_health.py", \
         "127.0.0.1:7600", "/var/lib/polyarch/coordinator/tls/ca.pem"]
# The settings of deploy/compose/coordinator.toml and the Kubernetes ConfigMap, as flags, so
# the image runs with no config file; those mount one and run
# `coordinator --config /etc/polyarch/coordinator.toml` instead. The first admin token is
# /var/lib/polyarch/coordinator/admin.token.
ENTRYPOINT ["/opt/polyarch/bin/polyarch"]
CMD ["coordinator", "--listen", "0.0.0.0:7600", "--agent-listen", "0.0.0.0:7601", \
     "--metrics-listen", "0.0.0.0:9600", "--data-dir", "/var/lib/polyarch/coordinator"]
