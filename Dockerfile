# The Airflow image of docker-compose.yml (every Airflow service and both Celery workers):
# Airflow and Flywheel at the exact versions of constraints.txt, with the DAGs and plugins.
# Build context: the repository root (.dockerignore keeps it small). The deployment's changes
# to the projects' params.yaml are not baked in: docker-compose.yml mounts them as the
# `flywheel-params` config.
FROM python:3.11.11-slim-bookworm

# curl: the healthchecks of the api-server and the scheduler. A Java runtime: pyspark's JVM, in the
# Airflow workers (Spark drivers of data.engine spark) and the compose file's Spark master and
# worker, which run this image. (The man1 folder: the JRE's postinstall fails without it on slim.)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends curl openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

ENV AIRFLOW_HOME=/opt/airflow \
    FLYWHEEL_HOME=/flywheel \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/flywheel

# torch from PyPI is the CUDA build on Linux x86_64: the gpu worker trains on its GPU.
COPY pyproject.toml constraints.txt README.md ./
COPY pipelines/ pipelines/
# The split stage every project shares, beside the package (pipelines.data.versioning.STAGE_FILE).
COPY dvc.yaml ./
RUN pip install -c constraints.txt ".[cluster,spark]"

COPY dags/ dags/
COPY plugins/ plugins/
# What airflow-init copies into an empty shared deployment home: the projects and the shared suites.
COPY projects/ project/projects/
COPY expectations/ project/expectations/

RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow
USER 50000
ENTRYPOINT ["airflow"]
