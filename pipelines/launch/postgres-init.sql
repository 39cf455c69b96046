-- The databases of Flywheel's services beside Airflow's metadata ($POSTGRES_DB), owned by the
-- same user: MLflow's tracking store (the mlflow service's backend store) and Optuna's studies
-- (tracking.study_storage, the tune__<project> DAGs). docker-compose.yml mounts this file into
-- /docker-entrypoint-initdb.d, which the postgres image runs with psql once, when it initialises
-- an empty data volume. Idempotent, so it can be run again by hand on a volume initialised before
-- (the command is beside the mount in docker-compose.yml). CREATE DATABASE cannot run inside a
-- transaction or a DO block: psql's \gexec runs each statement the query returns.
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SELECT 'CREATE DATABASE optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')\gexec
