# syntax=docker/dockerfile:1
# booking-service image. Build: docker build -t booking-service .
# Run:   docker run -e DATABASE_URL=postgresql://user:pass@host:5432/db -p 50051:50051 booking-service
# (or: docker compose up --build)

# ---- builder: venv with the project and its runtime dependencies -------------
FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first (cached until pyproject.toml changes).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project itself (regular, non-editable install; gen/ is committed).
COPY setup.py ./
COPY gen ./gen
COPY migrations ./migrations
COPY storage ./storage
COPY service ./service
COPY bench ./bench
COPY chaos ./chaos
RUN pip install --no-deps . \
    && python -c "import booking, service, storage, bench, chaos"

# ---- runtime ------------------------------------------------------------------
FROM python:3.11-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 booking \
    && useradd --system --uid 10001 --gid booking --home-dir /app --shell /usr/sbin/nologin booking \
    && mkdir -p /app && chown booking:booking /app
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
USER booking:booking
# Required at run time: DATABASE_URL=postgresql://user:password@host:5432/dbname
EXPOSE 50051
ENTRYPOINT ["booking-service"]
CMD ["serve", "--host", "0.0.0.0"]
