"""The on-call pages of Flywheel inside the Airflow UI: the projects, their drift reports and model versions.

``flywheel_oncall_plugin.py`` (beside this package) registers them with Airflow; ``app`` is
the FastAPI app the api-server mounts, ``data`` shapes what the pages show, ``pages`` renders it.
"""
