"""Tooling, apart from the product: local launchers of Airflow (LocalExecutor, and Celery with
its workers), of Triton from the nvidia-pytriton wheel, and the demo. Nothing in a DAG's task
imports them; a deployment runs its servers its own way (docker-compose.yml)."""
