# syntax=docker/dockerfile:1
# Sluicegate image: `docker run sluicegate` runs the proxy with /etc/sluicegate/sluicegate.yaml;
# `docker run sluicegate backend --port 8080 --host 0.0.0.0` runs a demo upstream.

# --- builder: turn the project and its dependencies into wheels -----------------------
FROM python:3.11-slim AS builder
# Compilers live here only: setup.py compiles the hot modules with Cython (fetched as a
# build requirement), and any dependency without a prebuilt wheel is built here too.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- final: slim runtime, no compilers, non-root ------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sluicegate
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -c "import proxy; assert proxy.COMPILED, 'the builder compiled nothing'"
COPY config/sluicegate.yaml /etc/sluicegate/sluicegate.yaml
USER sluicegate
WORKDIR /tmp
EXPOSE 8080 9901
# The slim image has no curl; the admin API answers /healthz while the process runs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["sluicegate"]
CMD ["run", "-c", "/etc/sluicegate/sluicegate.yaml"]
