# Rampart image: one image for every process (web, edge, worker, beat, migrate); the compose
# file picks the command. Configuration comes only from environment variables (.env.example).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Import the project from /app (not the copy pip puts in site-packages) so that
    # BASE_DIR finds templates/ and static/ next to the code.
    PYTHONPATH=/app \
    DJANGO_SETTINGS_MODULE=config.settings.production \
    RAMPART_DATA_DIR=/app/var

WORKDIR /app

RUN groupadd --system --gid 10001 rampart \
    && useradd --system --uid 10001 --gid rampart --home-dir /app --shell /usr/sbin/nologin rampart

# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY config ./config
COPY experiments ./experiments
COPY routing ./routing
COPY analysis ./analysis
RUN pip install .

COPY manage.py ./
COPY templates ./templates
COPY static ./static

# collectstatic only reads settings; the secret and hosts given here exist for this step only.
RUN DJANGO_SECRET_KEY=collectstatic-only DJANGO_ALLOWED_HOSTS=localhost \
        python manage.py collectstatic --noinput --verbosity 0 \
    && mkdir -p /app/var \
    && chown -R rampart:rampart /app/var

USER rampart

EXPOSE 8000

CMD ["uvicorn", "config.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--no-access-log", "--http", "routing.edge.server:EdgeHttpProtocol"]
