# booking-service image. Build: docker build -t booking-service .
#   behind a registry mirror: docker build --build-arg PYTHON_IMAGE=mirror.example/python:3.11-slim .
#   without any registry: scripts/image-test (podman, a base made from Debian's packages;
#   docs/operations.md, "The image")
# Run:   docker run -e DATABASE_URL=postgresql://user:pass@host:5432/db -p 50051:50051 booking-service
# (or: docker compose up --build)
#
# The image carries the service and its runtime dependencies only: no benchmark
# and no embedded PostgreSQL (the `embedded` extra), so DATABASE_URL is required.

# One base for both stages: the venv built in the first is copied into the second.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: venv with the project and its runtime dependencies -------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first (cached until pyproject.toml changes), extracted the same way
# tests/test_image.py installs them.
COPY pyproject.toml scripts/runtime_requirements.py ./
RUN python runtime_requirements.py pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project itself (regular, non-editable install; gen/ is committed).
COPY setup.py ./
COPY gen ./gen
COPY migrations ./migrations
COPY storage ./storage
COPY service ./service
RUN pip install --no-deps . \
    && python -c "import booking, service, storage, grpc_health.v1.health_pb2_grpc"

# ---- runtime ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 booking \
    && useradd --system --uid 10001 --gid booking --home-dir /app --shell /usr/sbin/nologin booking \
    && mkdir -p /app && chown booking:booking /app
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Numeric, so a runtime that enforces non-root (runAsNonRoot) can verify it.
USER 10001:10001
# Required at run time: DATABASE_URL=postgresql://user:password@host:5432/dbname
EXPOSE 50051
# gRPC health check (grpc.health.v1) over plaintext on BOOKING_PORT: exit 0 only when
# SERVING. A server with TLS needs its own probe. docker-compose.yml repeats this probe.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('BOOKING_PORT', '50051')); r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["booking-service"]
CMD ["serve", "--host", "0.0.0.0"]
