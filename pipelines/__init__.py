"""Flywheel: the logic behind the Airflow DAGs, importable and testable without a scheduler."""
