# The polyarch CLI, built by the farm itself for linux/amd64 and linux/arm64 (README: "The CLI
# image"). BASE is deploy/docker/python-base.sh's image. The context is a directory whose
# wheels/ holds `polyarch wheelhouse` output for every target arch side by side: inside each
# platform's build pip picks that platform's wheels by their tags, with no index.
ARG BASE
FROM ${BASE}
# The wheelhouse is bind-mounted, never copied, so no wheel lands in a layer. pip runs from its
# own wheel, so the image has neither pip nor python3-venv, only the venv it installs into.
RUN --mount=type=bind,source=wheels,target=/wheels \
    set -- /wheels/pip-*.whl \
    && python3 -m venv --without-pip /opt/polyarch \
    && /opt/polyarch/bin/python "$1/pip" install --no-index --find-links /wheels \
        --no-cache-dir --disable-pip-version-check --no-warn-script-location polyarch \
    && /opt/polyarch/bin/polyarch --version
ENV PATH=/opt/polyarch/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title="polyarch" \
      org.opencontainers.image.description="polyarch CLI: multi-arch image builds on a polyarch farm"
ENTRYPOINT ["/opt/polyarch/bin/polyarch"]
CMD ["--help"]
