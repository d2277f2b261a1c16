# sealstream worker image: the package is installed at build time; keys and the Redis
# password are mounted at run time (compose secrets), never copied into the image.
#   docker build -t sealstream .
#   docker run --rm sealstream --help
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SEALSTREAM_LOG_FORMAT=json \
    SEALSTREAM_METRICS_PORT=9400 \
    SEALSTREAM_METRICS_ADDR=0.0.0.0
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sealstream
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip install --no-cache-dir . && rm -rf /src
USER 10001:10001
WORKDIR /app
EXPOSE 9400
# Ready = connected to Redis and consuming (README, "Operations").
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SEALSTREAM_METRICS_PORT', '9400'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sealstream"]
CMD ["worker"]
