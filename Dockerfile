# One image for every credential-broker process: api, worker, beat, flower, and
# the one-shot `db upgrade`. The command picks the role (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs: no .env, .git, virtualenvs or test data in the image.
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY workers ./workers
COPY sandbox ./sandbox
RUN pip install . && rm -rf /app/build

# An unprivileged user; beat keeps its schedule in the state folder.
RUN useradd --system --uid 10001 --home-dir /var/lib/credbroker --create-home credbroker
USER credbroker
WORKDIR /var/lib/credbroker
ENV CREDBROKER_STATE_DIR=/var/lib/credbroker/state

EXPOSE 8080
ENTRYPOINT ["credbroker"]
CMD ["api", "--host", "0.0.0.0", "--port", "8080"]
