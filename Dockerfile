# smtpdup container image.
#
#   docker build -t smtpdup .
#   docker run -d --name smtpdup --stop-timeout 45 \
#     -e SMTP_DUP_RELAY_DESTINATION_PRIMARY=mx-old.internal.example:25 \
#     -e SMTP_DUP_RELAY_DESTINATION_BACKUPS=mx-new.internal.example:25 \
#     -v smtpdup-spool:/var/spool/smtpdup -p 2525:2525 -p 9925:9925 smtpdup
#
# Configuration comes from SMTP_DUP_* variables, or mount a file at
# /etc/smtp-dup/config.yaml (found automatically; the environment still wins).
# smtp.allowed_networks defaults to loopback and private ranges, which covers
# Docker's bridge networks; set SMTP_DUP_SMTP_ALLOWED_NETWORKS to narrow it.
# --stop-timeout 45: SIGTERM lets transactions in flight finish for
# smtp.shutdown_grace_seconds (30); Docker's default 10 s would cut them.

FROM python:3.11-slim

# OCI annotations (https://github.com/opencontainers/image-spec/blob/main/annotations.md).
# Set version and revision at build time:
#   docker build --build-arg VERSION=$(python3 -c 'import smtpdup; print(smtpdup.__version__)') \
#     --build-arg REVISION=$(git rev-parse HEAD) -t smtpdup .
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="smtpdup" \
      org.opencontainers.image.description="SMTP relay that duplicates mail for mail-server migrations: synchronous primary, spooled asynchronous backups" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/smtpdup

# Runtime pins only: requirements.txt lists test-only pins after a marker.
# A layer of its own, so code changes do not reinstall the dependencies.
COPY requirements.txt ./
RUN sed '/^# --- test only/,$d' requirements.txt > /tmp/runtime.txt \
    && pip install -r /tmp/runtime.txt \
    && rm /tmp/runtime.txt

COPY pyproject.toml ./
COPY smtpdup ./smtpdup
RUN pip install --no-deps . && rm -rf build *.egg-info

# A fixed, numeric uid/gid: Kubernetes' runAsNonRoot can only verify a
# numeric USER, and deploy/kubernetes/ sets runAsUser/fsGroup to the same.
RUN groupadd --system --gid 10025 smtpdup \
    && useradd --system --uid 10025 --gid smtpdup --home-dir /var/spool/smtpdup --shell /usr/sbin/nologin smtpdup \
    && install -d -o smtpdup -g smtpdup -m 0750 /var/spool/smtpdup

ENV SMTP_DUP_RELAY_SPOOL_DIR=/var/spool/smtpdup \
    SMTP_DUP_SMTP_LISTEN=0.0.0.0:2525 \
    SMTP_DUP_METRICS_LISTEN=0.0.0.0:9925

# Declared after the chown above, so a new named volume starts owned by smtpdup.
VOLUME /var/spool/smtpdup
EXPOSE 2525 9925

USER 10025:10025

# `smtpdup health` probes what this configuration runs: /healthz on
# metrics.listen, or (SMTP_DUP_METRICS_LISTEN= empty: metrics disabled) the
# SMTP greeting on smtp.listen. Exit 0 healthy, 1 not; a wildcard address
# is probed on loopback. Its own timeout (4 s) stays below --timeout.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["smtpdup", "health"]

ENTRYPOINT ["smtpdup"]
