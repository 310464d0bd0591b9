# syntax=docker/dockerfile:1
# quota-sidecar's image: a wheel built in one stage, installed with pinned dependencies in a
# slim runtime stage with no compilers. Runs as a numeric non-root user and writes nothing
# outside /tmp, so it works on a read-only root filesystem.
#
#   docker build -t quota-sidecar:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 --read-only --tmpfs /tmp \
#     -e QUOTA_CLIENT_ID -e QUOTA_CLIENT_SECRET -e SESSION_SECRET -e REDIS_URL quota-sidecar:0.1.0
#
# Reproducible: every runtime dependency is pinned in constraints.txt (scripts/pin-constraints)
# and installed from binary wheels only. Pin the base image by digest in your registry if you
# need byte-for-byte rebuilds.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="quota-sidecar" \
      org.opencontainers.image.description="Lets any web app bill its users' AI calls to their own Quota wallet." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt /tmp/constraints.txt
COPY --from=builder /wheels/ /tmp/wheels/
# Binary wheels only: nothing compiles, so the image needs no compiler. pip compiles the
# bytecode now, while the filesystem is writable.
# The `fast` extra (uvloop): `quota-sidecar run` takes it when it is there.
RUN python -m pip install --no-cache-dir --only-binary=:all: -c /tmp/constraints.txt \
      "$(ls /tmp/wheels/*.whl)[fast]" \
 && rm -rf /tmp/wheels /tmp/constraints.txt
# A numeric user, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 quota \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin quota
# The working directory holds nothing; config comes from --config, QUOTA_SIDECAR_CONFIG or a
# file mounted at /srv/quota-sidecar/config/sidecar.yaml (read when present).
WORKDIR /srv/quota-sidecar
USER 10001:10001
# public (browsers), internal (the app's backend; loopback by default), admin (probes, metrics)
EXPOSE 8080 8081 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["quota-sidecar"]
CMD ["run"]
