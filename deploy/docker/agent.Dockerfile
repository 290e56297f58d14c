# A polyarch build agent with rootless buildah, built by the farm itself for linux/amd64 and
# linux/arm64 (README: "The coordinator and agent images"); what deploy/compose and
# deploy/kubernetes run. BASE is deploy/docker/agent-base.sh's image: python-base.sh's
# Debian minbase + python3 with buildah, uidmap, libcap2-bin and ca-certificates from
# Debian, so this build needs no package index either. The context is coordinator.Dockerfile's
# (wheels/ for every target arch, probes/).
ARG BASE
FROM ${BASE}
# The venv as in cli.Dockerfile. The build user is uid 1000 (what compose and the
# DaemonSets run as) with a subordinate id range, which newuidmap/newgidmap map into
# buildah's user namespace; /var/lib/polyarch-agent is its own, so a new named volume or
# emptyDir mounted there is writable by it.
# newuidmap/newgidmap get file capabilities (cap_setuid / cap_setgid) instead of Debian's
# setuid-root bit, as the upstream buildah image does. Run setuid, they open and write
# /proc/PID/uid_map as root, which takes CAP_DAC_OVERRIDE to open it and CAP_SYS_ADMIN to
# write it, so in a container with only SETUID and SETGID (compose, the DaemonSets) buildah
# would fall back to mapping one id. Run as the build user with one file capability each,
# they need nothing more (the test checks the full mapping under exactly those grants).
RUN --mount=type=bind,source=wheels,target=/wheels \
    set -- /wheels/pip-*.whl \
    && python3 -m venv --without-pip /opt/polyarch \
    && /opt/polyarch/bin/python "$1/pip" install --no-index --find-links /wheels \
        --no-cache-dir --disable-pip-version-check --no-warn-script-location polyarch \
    && /opt/polyarch/bin/polyarch --version \
    && buildah --version \
    && groupadd --gid 1000 polyarch \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/polyarch \
        --shell /bin/sh polyarch \
    && echo polyarch:100000:65536 >/etc/subuid \
    && echo polyarch:100000:65536 >/etc/subgid \
    && chmod 0755 /usr/bin/newuidmap /usr/bin/newgidmap \
    && setcap cap_setuid=ep /usr/bin/newuidmap \
    && setcap cap_setgid=ep /usr/bin/newgidmap \
    && install -d -o 1000 -g 1000 -m 0755 /var/lib/polyarch-agent
COPY probes/agent_connected.py /etc/polyarch-probes/agent_connected.py
# BUILDAH_ISOLATION and STORAGE_DRIVER as compose and the DaemonSets set them (their comments
# say why): RUN steps in a chroot, kernel overlayfs in buildah's user namespace.
ENV PATH=/opt/polyarch/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    BUILDAH_ISOLATION=chroot \
    STORAGE_DRIVER=overlay
LABEL org.opencontainers.image.title="polyarch-agent" \
      org.opencontainers.image.description="polyarch build agent with rootless buildah"
USER 1000:1000
WORKDIR /home/polyarch
VOLUME ["/var/lib/polyarch-agent"]
# Prometheus metrics, when metrics_listen says so (compose and Kubernetes: 0.0.0.0:9601).
EXPOSE 9601
# The config (coordinator address, builder = "buildah", ...) is mounted there, the token
# comes as POLYARCH_TOKEN or POLYARCH_TOKEN_FILE, the name with --name.
ENTRYPOINT ["/opt/polyarch/bin/polyarch"]
CMD ["agent", "--config", "/etc/polyarch/agent.toml"]
