"""``flywheel``: the command line of a Flywheel deployment (the one in ``$FLYWHEEL_HOME``).

Every command that concerns one model names its project (``projects/<project>/``). A user
mistake (an unknown project, a missing column, a bad file) ends with one line that says what
was wrong and what was expected, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from pipelines.config import load_config, load_deployment, load_project, load_text_project, project_home, project_kinds
from pipelines.errors import DataLocked, NotRetryable, TritonUnavailable
from pipelines.launch.mlflow_server import MlflowServerError
from pipelines.launch.up import UpError


def cmd_init(args: argparse.Namespace) -> None:
    from pipelines.data.profile import init_project

    folder, profile = init_project(
        project_home(), args.project, args.sample, args.label, task=args.task, time_column=args.time,
        id_column=args.id, exclude=tuple(args.exclude), force=args.force,
    )
    print("\n".join(profile.summary))
    print(f"\nwrote {folder / 'params.yaml'} and {folder / 'expectations.json'}; the project's DAGs appear at the next parse:")
    print(f"  retrain__{args.project}, drift__{args.project}, feedback__{args.project}, performance__{args.project}, rollout__{args.project}, rollback__{args.project}, revert_batch__{args.project}")
    print(f"land batches with `flywheel land {args.project} <file.csv|file.parquet>`")


def cmd_land(args: argparse.Namespace) -> None:
    from pipelines.data.ingest import land_file

    print(land_file(load_config(args.project).dataset, args.file))


def cmd_land_feedback(args: argparse.Namespace) -> None:
    from pipelines.feedback.labels import land_feedback

    print(land_feedback(load_config(args.project), args.file))


def cmd_replay(args: argparse.Namespace) -> None:
    from pipelines.data.replay import land

    config = load_config(args.project)
    for month in args.months:
        print(land(config.dataset, month, rows=args.rows, broken=args.broken))


def cmd_finetune_data(args: argparse.Namespace) -> None:
    from pipelines.finetune.data import write_review_datasets

    for name, path in write_review_datasets(load_text_project(args.project).finetune.landing_dir).items():
        print(f"{name}: {path}")


def cmd_classify(args: argparse.Namespace) -> None:
    from pipelines.finetune.serving import classify

    labels, scores = classify(load_text_project(args.project), args.texts)
    for text, label, score in zip(args.texts, labels, scores):
        print(json.dumps({"text": text, "label": label, "score": round(float(score.max()), 4)}))


def cmd_demo(args: argparse.Namespace) -> None:
    from pipelines.launch import demo

    home = project_home()
    print(demo.report(home, *demo.run(home, fresh=args.fresh, port=args.port)))


def cmd_up(args: argparse.Namespace) -> None:
    import contextlib

    from pipelines.launch.airflow import LocalAirflow
    from pipelines.launch.demo import REPO
    from pipelines.launch.mlflow_server import MlflowServer
    from pipelines.launch.triton import TritonServer
    from pipelines.launch.up import Supervised, only_instance, supervise

    deployment = load_deployment()
    airflow = LocalAirflow(REPO / ".airflow", REPO / "dags", REPO / "plugins", port=args.port, extra_env={"FLYWHEEL_HOME": str(deployment.home)})
    triton = TritonServer(deployment)
    # No tracking.uri: no server, and nothing is tracked.
    mlflow = MlflowServer(deployment) if deployment.tracking.uri else None
    with only_instance(airflow.airflow_home, airflow_port=args.port, triton=triton.url, mlflow=mlflow.url if mlflow else "off"), contextlib.ExitStack() as running:
        if mlflow:  # launched first, ready checked last: its start-up runs beside Triton's and Airflow's
            running.callback(mlflow.stop)
            mlflow.launch()
        running.enter_context(triton)
        running.enter_context(airflow)
        servers: dict[str, Supervised] = {"Triton": triton, "Airflow": airflow}
        tracking = "MLflow:  off (tracking.uri is null: training runs are not tracked)"
        if mlflow:
            mlflow.wait_ready()
            servers["MLflow"] = mlflow
            tracking = f"MLflow:  {deployment.tracking.ui_url} (tracking server {mlflow.url}; runs in {mlflow.database}, artifacts in {mlflow.artifacts})"
        print(
            f"Airflow: http://localhost:{args.port} (user admin, password {airflow.password})\n"
            f"Triton:  {triton.url} (gRPC :{deployment.serving.triton.grpc_port}, metrics :{deployment.serving.triton.metrics_port})\n"
            f"{tracking}\n"
            f"Projects: {', '.join(project_kinds(deployment.home))}\n"
            f"Restarted if it exits: {', '.join(name for name in servers if name != 'Airflow')}. Ctrl-C stops everything.",
            flush=True,
        )
        try:
            supervise(servers, restartable={"Triton", "MLflow"})
        except KeyboardInterrupt:
            pass


def cmd_serve(args: argparse.Namespace) -> None:
    from pipelines.launch.triton import TritonServer

    with TritonServer(load_deployment()) as triton:
        print(f"Triton serving {triton.repository} on {triton.url}; Ctrl-C stops it.", flush=True)
        try:
            triton.wait()
        except KeyboardInterrupt:
            pass


def cmd_predict(args: argparse.Namespace) -> None:
    from pipelines.serving.client import ServedModel, read_requests

    config = load_config(args.project)
    rows = read_requests(config.name, config.dataset, args.file, rows=args.rows)
    with ServedModel(config) as model:
        rows["prediction"] = model.predict(rows)
    shown = [c for c in (config.dataset.id_column, config.dataset.time_column, config.dataset.label.column) if c and c in rows.columns]
    print(rows[[*shown, "prediction"]].to_string(index=False))


def cmd_traffic(args: argparse.Namespace) -> None:
    from pipelines.serving.client import read_requests, send

    config = load_config(args.project)
    print(json.dumps(send(config, read_requests(config.name, config.dataset, args.file, rows=args.rows), batch_size=args.batch_size)))


def cmd_rollback(args: argparse.Namespace) -> None:
    from pipelines.serving.rollback import rollback

    run = {"dag_id": None, "run_id": f"cli__{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"}
    print(json.dumps(rollback(load_project(args.project), args.version, run, args.reason)))


def cmd_alert_receiver(args: argparse.Namespace) -> None:
    from pipelines.monitoring.alert_receiver import run_from_args

    run_from_args(args)


def cmd_batches(args: argparse.Namespace) -> None:
    from pipelines.data.batches import list_batches

    for row in list_batches(load_config(args.project)):
        print(json.dumps(row))


def cmd_revert_batch(args: argparse.Namespace) -> None:
    from pipelines.data.batches import revert

    by = {"user": getpass.getuser(), "via": "flywheel revert-batch"}
    print(json.dumps(revert(load_config(args.project), args.batch, args.reason, by, timeout=args.wait)))


def cmd_seed_noise(args: argparse.Namespace) -> None:
    from pipelines.data.versioning import version_split
    from pipelines.evaluation.seed_noise import measure

    if args.seeds < 2:
        sys.exit(f"--seeds {args.seeds}: a standard deviation needs at least two trainings")
    config = load_config(args.project)
    record = measure(config, version_split(config)["data_version"], args.seeds)
    print(json.dumps({k: v for k, v in record.items() if k != "data_version"}))
    print(f"# in projects/{config.name}/params.yaml: gate: {{seed_noise: {record['seed_noise']:.4f}}}", file=sys.stderr)


def cmd_versions(args: argparse.Namespace) -> None:
    from pipelines.serving.repository import version_rows

    for project in [args.project] if args.project else list(project_kinds()):
        config = load_project(project)
        for row in version_rows(config.name, config.served_model_dir):
            print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="add a tabular project, profiled from a sample file")
    init.add_argument("project", help="its name: lowercase letters, digits and _")
    init.add_argument("--from", dest="sample", type=Path, required=True, metavar="SAMPLE", help="a CSV or parquet sample of the data")
    init.add_argument("--label", required=True, help="the column to predict")
    init.add_argument("--task", choices=["classification", "regression"], help="default: inferred from the label")
    init.add_argument("--time", help="a time column: the split is then by time (else a seeded hash split)")
    init.add_argument("--id", help="an id column (else a row's id is a hash of its values)")
    init.add_argument("--exclude", nargs="*", default=[], metavar="COLUMN", help="columns that are not features (e.g. they leak the label)")
    init.add_argument("--force", action="store_true", help="overwrite an existing project's params.yaml and suite")
    init.set_defaults(run=cmd_init)

    land = commands.add_parser("land", help="land a CSV batch for a project's next retrain")
    land.add_argument("project")
    land.add_argument("file", type=Path)
    land.set_defaults(run=cmd_land)

    land_feedback = commands.add_parser("land-feedback", help="land a file of ground truth (request_id,label[,observed_at]) for feedback__<project>")
    land_feedback.add_argument("project")
    land_feedback.add_argument("file", type=Path)
    land_feedback.set_defaults(run=cmd_land_feedback)

    replay = commands.add_parser("replay", help="land months of the 2013 flights as batches of a project")
    replay.add_argument("project")
    replay.add_argument("months", nargs="+", metavar="YYYY-MM")
    replay.add_argument("--rows", type=int, help="a random sample of this many rows per month")
    replay.add_argument("--broken", action="store_true", help="corrupt the batch, as an upstream bug would")
    replay.set_defaults(run=cmd_replay)

    finetune_data = commands.add_parser("finetune-data", help="land the review datasets (text, Alpaca, chat) of a text project")
    finetune_data.add_argument("project")
    finetune_data.set_defaults(run=cmd_finetune_data)

    classify = commands.add_parser("classify", help="send texts to a text project's served classifier")
    classify.add_argument("project")
    classify.add_argument("texts", nargs="+")
    classify.set_defaults(run=cmd_classify)

    demo = commands.add_parser("demo", help="the loop of three projects through one Airflow and one Triton")
    demo.add_argument("--fresh", action="store_true", help="clear the projects' data, models and DVC state first")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(run=cmd_demo)

    up = commands.add_parser("up", help="run a local Airflow, Triton and MLflow tracking server until Ctrl-C")
    up.add_argument("--port", type=int, default=8080)
    up.set_defaults(run=cmd_up)

    serve = commands.add_parser("serve", help="run Triton on the model repository until Ctrl-C")
    serve.set_defaults(run=cmd_serve)

    predict = commands.add_parser("predict", help="score rows of a file through a project's served model")
    predict.add_argument("project")
    predict.add_argument("file", type=Path, help="CSV or parquet with the project's feature columns")
    predict.add_argument("--rows", type=int, default=10)
    predict.set_defaults(run=cmd_predict)

    traffic = commands.add_parser("traffic", help="send a file's rows to a project's served model, logged for drift")
    traffic.add_argument("project")
    traffic.add_argument("file", type=Path, help="CSV or parquet with the project's feature columns")
    traffic.add_argument("--rows", type=int, help="only the first N rows")
    traffic.add_argument("--batch-size", type=int, default=32, help="rows per request")
    traffic.set_defaults(run=cmd_traffic)

    rollback = commands.add_parser("rollback", help="serve a previous version of a project's model again, or end a rollout in progress")
    rollback.add_argument("project")
    rollback.add_argument("version", type=int, nargs="?", help="the version to serve; omitted: end a rollout in progress, else the version served before")
    rollback.add_argument("--reason", default="", help="why (goes into the serving history)")
    rollback.set_defaults(run=cmd_rollback)

    from pipelines.monitoring import alert_receiver

    receiver = commands.add_parser("alert-receiver", help="Alertmanager's webhook (POST /alerts): trigger rollback__<project> for firing rollback alerts, until Ctrl-C")
    alert_receiver.add_arguments(receiver)
    receiver.set_defaults(run=cmd_alert_receiver)

    batches = commands.add_parser("batches", help="the batches ingested into a tabular project's raw data")
    batches.add_argument("project")
    batches.set_defaults(run=cmd_batches)

    revert_batch = commands.add_parser("revert-batch", help="take a batch out of a project's raw data, back into quarantine")
    revert_batch.add_argument("project")
    revert_batch.add_argument("batch", help="its name as `flywheel batches` lists it")
    revert_batch.add_argument("--reason", required=True, help="why: kept with the batch in quarantine and in the ledger")
    revert_batch.add_argument("--wait", type=float, default=60, help="seconds to wait for a running retrain to let go of the data")
    revert_batch.set_defaults(run=cmd_revert_batch)

    seed_noise = commands.add_parser("seed-noise", help="measure how much the gate metric moves between training seeds (gate.seed_noise)")
    seed_noise.add_argument("project")
    seed_noise.add_argument("--seeds", type=int, default=5, help="trainings on the current split, one a seed (default 5)")
    seed_noise.set_defaults(run=cmd_seed_noise)

    versions = commands.add_parser("versions", help="the published versions of every project's model (or one project's)")
    versions.add_argument("project", nargs="?")
    versions.set_defaults(run=cmd_versions)

    args = parser.parse_args(argv)
    # SIGTERM (kill, a service manager) stops the servers a command started as Ctrl-C does: the
    # exit unwinds their context managers, which stop Airflow, Triton and the MLflow server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (NotRetryable, ValueError, FileNotFoundError, TritonUnavailable, DataLocked, UpError, MlflowServerError) as error:
        sys.exit(f"flywheel {args.command}: {error}")


if __name__ == "__main__":
    main()
