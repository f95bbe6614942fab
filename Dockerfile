# Container image for the billing batch jobs (`billing-jobs`).
#
#   docker build -t billing-jobs:0.1.0 .
#   docker run --rm -e BILLING_DB_URL=postgresql+psycopg://user:pass@host/db \
#       billing-jobs:0.1.0 nightly
#
# The database URL is read from BILLING_DB_URL at run time (or --db-url); the
# image carries no default and no secret. Settings come from BILLING_CONFIG,
# which points at the copy of config/billing.toml baked in below; mount another
# file (for example a Kubernetes ConfigMap) and point BILLING_CONFIG at it to
# override.
#
# No HEALTHCHECK: every command except `schedule` is a run-to-completion batch
# job whose exit code is its health (0 ok, 1 failure, 2 bad arguments or
# settings, 75 another run holds the lock). For a long-running `schedule`
# container, probe with `billing-jobs status`, which exits non-zero when a
# month close is overdue.

# ---- build stage: install the project and its dependencies into a venv ----
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The build context is limited by .dockerignore to pyproject.toml, README.md,
# requirements.lock, billing_jobs/ and config/.
COPY . ./
# The dependencies come from the lock file: exact versions, every file checked
# against its sha256 (the versions CI tested; regenerate with scripts/lock).
# The project itself adds no dependency of its own (--no-deps).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.lock \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps .

# ---- runtime stage: the same base image plus the venv, run as a non-root user ----
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BILLING_CONFIG=/app/config/billing.toml

# A fixed numeric uid/gid so that Kubernetes runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 billing \
    && useradd --system --uid 10001 --gid billing --home-dir /app \
        --no-create-home --shell /usr/sbin/nologin billing

COPY --from=build /opt/venv /opt/venv
COPY config/ /app/config/

WORKDIR /app
USER 10001:10001

ENTRYPOINT ["billing-jobs"]
CMD ["--help"]
