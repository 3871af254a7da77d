# CIRCUS API server: gunicorn on port 8080 and the worker beside it (scripts/serve.sh),
# everything persistent in the /data volume (SQLite unless DATABASE_URL is set).
#   docker build -t circus-api .
#   docker run -p 8080:8080 -v circus-data:/data circus-api    # the first run logs a token
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CIRCUS_DATA_DIR=/data \
    HOST=0.0.0.0 \
    CIRCUS_USE_SYSTEM_PYTHON=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .
RUN useradd --system --create-home --uid 10001 circus \
    && mkdir -p /data && chown circus:circus /data

USER circus
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["./scripts/serve.sh"]
