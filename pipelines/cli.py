"""``flywheel``: the command line of a Flywheel project (the one in ``$FLYWHEEL_HOME``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone

from pipelines.config import load_config
from pipelines.serving.triton import TritonUnavailable


def cmd_replay(args: argparse.Namespace) -> None:
    from pipelines.data.replay import land

    config = load_config()
    for month in args.months:
        print(land(config, month, rows=args.rows, broken=args.broken))


def cmd_finetune_data(args: argparse.Namespace) -> None:
    from pipelines.finetune.data import write_review_datasets

    for name, path in write_review_datasets(load_config()).items():
        print(f"{name}: {path}")


def cmd_classify(args: argparse.Namespace) -> None:
    from pipelines.finetune.serving import classify

    config = load_config()
    labels, scores = classify(config.serving.triton.url, config.finetune.model_name, args.texts)
    for text, label, score in zip(args.texts, labels, scores):
        print(json.dumps({"text": text, "label": label, "score": round(float(score.max()), 4)}))


def cmd_demo(args: argparse.Namespace) -> None:
    from pipelines import demo

    config = load_config()
    print(demo.report(config, *demo.run(config, fresh=args.fresh, port=args.port)))


def cmd_up(args: argparse.Namespace) -> None:
    from pipelines.airflow_local import LocalAirflow
    from pipelines.demo import REPO
    from pipelines.serving.triton import TritonServer

    config = load_config()
    airflow = LocalAirflow(REPO / ".airflow", REPO / "dags", REPO / "plugins", port=args.port, extra_env={"FLYWHEEL_HOME": str(config.home)})
    with TritonServer(config) as triton, airflow:
        print(
            f"Airflow: http://localhost:{args.port} (user admin, password {airflow.password})\n"
            f"Triton:  {triton.url} (gRPC :{config.serving.triton.grpc_port}, metrics :{config.serving.triton.metrics_port})\n"
            "Ctrl-C stops both.",
            flush=True,
        )
        try:
            airflow.wait()
        except KeyboardInterrupt:
            pass


def cmd_serve(args: argparse.Namespace) -> None:
    from pipelines.serving.triton import TritonServer

    with TritonServer(load_config()) as triton:
        print(f"Triton serving {triton.repository} on {triton.url}; Ctrl-C stops it.", flush=True)
        try:
            triton.wait()
        except KeyboardInterrupt:
            pass


def cmd_predict(args: argparse.Namespace) -> None:
    from pipelines.data.replay import month_batch
    from pipelines.serving.client import ServedModel

    config = load_config()
    rows = month_batch(args.month, rows=args.rows)
    with ServedModel(config) as model:
        rows["prediction"] = model.predict(rows)
    print(rows[[config.dataset.id_column, config.dataset.time_column, config.dataset.label.column, "prediction"]].to_string(index=False))


def cmd_traffic(args: argparse.Namespace) -> None:
    from pipelines.serving.client import replay_traffic

    config = load_config()
    for month in args.months:
        print(json.dumps(replay_traffic(config, month, rows=args.rows, batch_size=args.batch_size)))


def cmd_rollback(args: argparse.Namespace) -> None:
    from pipelines.serving.rollback import rollback

    run = {"dag_id": None, "run_id": f"cli__{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"}
    print(json.dumps(rollback(load_config(), args.model, args.version, run)))


def cmd_versions(args: argparse.Namespace) -> None:
    from pipelines.serving import repository

    config = load_config()
    served = repository.served_version(config.model_dir)
    for version in repository.versions(config.model_dir):
        lineage = repository.lineage_of(config.model_dir, version)
        gate = lineage["gate"]
        print(
            json.dumps(
                {
                    "version": version,
                    "serving": version == served,
                    "status": lineage.get("status", "published"),
                    gate["metric"]: gate["challenger"][gate["metric"]],
                    "decision": gate["reason"],
                    "run_id": lineage["airflow"]["run_id"],
                    "data": lineage["data_version"].get(str(config.dataset.raw_path)),
                }
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser("replay", help="land months of the 2013 flights as batches")
    replay.add_argument("months", nargs="+", metavar="YYYY-MM")
    replay.add_argument("--rows", type=int, help="a random sample of this many rows per month")
    replay.add_argument("--broken", action="store_true", help="corrupt the batch, as an upstream bug would")
    replay.set_defaults(run=cmd_replay)

    finetune_data = commands.add_parser("finetune-data", help="land the review datasets (text, Alpaca, chat) for the finetune DAG")
    finetune_data.set_defaults(run=cmd_finetune_data)

    classify = commands.add_parser("classify", help="send texts to the served fine-tuned classifier")
    classify.add_argument("texts", nargs="+")
    classify.set_defaults(run=cmd_classify)

    demo = commands.add_parser("demo", help="run the retrain DAG through Airflow over several nights")
    demo.add_argument("--fresh", action="store_true", help="clear the project's data, models and DVC state first")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(run=cmd_demo)

    up = commands.add_parser("up", help="run a local Airflow and Triton until Ctrl-C")
    up.add_argument("--port", type=int, default=8080)
    up.set_defaults(run=cmd_up)

    serve = commands.add_parser("serve", help="run Triton on the model repository until Ctrl-C")
    serve.set_defaults(run=cmd_serve)

    predict = commands.add_parser("predict", help="score flights of a month through the served model")
    predict.add_argument("month", metavar="YYYY-MM")
    predict.add_argument("--rows", type=int, default=10)
    predict.set_defaults(run=cmd_predict)

    traffic = commands.add_parser("traffic", help="replay months of flights through the served model, logged for drift")
    traffic.add_argument("months", nargs="+", metavar="YYYY-MM")
    traffic.add_argument("--rows", type=int, help="a random sample of this many rows per month")
    traffic.add_argument("--batch-size", type=int, default=32, help="rows per request")
    traffic.set_defaults(run=cmd_traffic)

    rollback = commands.add_parser("rollback", help="serve a previous version again")
    rollback.add_argument("model")
    rollback.add_argument("version", type=int)
    rollback.set_defaults(run=cmd_rollback)

    versions = commands.add_parser("versions", help="list the published versions of the model")
    versions.set_defaults(run=cmd_versions)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, TritonUnavailable) as error:
        sys.exit(f"flywheel {args.command}: {error}")


if __name__ == "__main__":
    main()
