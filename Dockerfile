# syntax=docker/dockerfile:1

# Builder: turns the project and every dependency into wheels, so the runtime stage installs
# offline and never needs a compiler or the source tree.
FROM python:3.12-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
# The pip cache mount keeps downloaded wheels between builds without baking them into a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels .


FROM python:3.12-slim

# PYTHONUNBUFFERED: log lines reach `docker logs` as they are written, not when a buffer fills.
# PYTHONDONTWRITEBYTECODE: the venv is precompiled at install time and read-only to the app user.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GPUPROXY_DATA_DIR=/var/lib/gpuproxy

# A bind mount from the builder instead of COPY: the wheels are used once and leave no layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links=/wheels gpuproxy

# A fixed numeric uid so volume ownership and runAsNonRoot policies do not depend on /etc/passwd.
RUN groupadd --system --gid 10001 gpuproxy \
    && useradd --system --uid 10001 --gid gpuproxy --home-dir /var/lib/gpuproxy \
        --no-create-home --shell /usr/sbin/nologin gpuproxy \
    && install -d -o gpuproxy -g gpuproxy /var/lib/gpuproxy

WORKDIR /var/lib/gpuproxy
USER 10001:10001

# HTTP (and /healthz, /readyz) and gRPC of `gpuproxy gateway`; workers listen on nothing.
EXPOSE 8080 9090

# No HEALTHCHECK here: one image runs gateways and workers, and workers serve no HTTP, so the
# check lives on the gateway services in compose.yaml.
ENTRYPOINT ["gpuproxy"]
CMD ["gateway"]
