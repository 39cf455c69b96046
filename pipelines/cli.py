"""``flywheel``: the command line of a Flywheel project (the one in ``$FLYWHEEL_HOME``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipelines.config import load_config


def cmd_replay(args: argparse.Namespace) -> None:
    from pipelines.data.replay import land

    config = load_config()
    for month in args.months:
        print(land(config, month, rows=args.rows, broken=args.broken))


def cmd_demo(args: argparse.Namespace) -> None:
    from pipelines import demo

    config = load_config()
    print(demo.report(config, demo.run(config, fresh=args.fresh, port=args.port)))


def cmd_up(args: argparse.Namespace) -> None:
    from pipelines.airflow_local import LocalAirflow
    from pipelines.demo import REPO

    config = load_config()
    with LocalAirflow(REPO / ".airflow", REPO / "dags", REPO / "plugins", port=args.port, extra_env={"FLYWHEEL_HOME": str(config.home)}) as airflow:
        print(f"Airflow is up on http://localhost:{args.port} (user admin, password {airflow.password}); Ctrl-C stops it.", flush=True)
        try:
            airflow.wait()
        except KeyboardInterrupt:
            pass


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

    demo = commands.add_parser("demo", help="run the retrain DAG through Airflow over several nights")
    demo.add_argument("--fresh", action="store_true", help="clear the project's data, models and DVC state first")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(run=cmd_demo)

    up = commands.add_parser("up", help="run a local Airflow until Ctrl-C")
    up.add_argument("--port", type=int, default=8080)
    up.set_defaults(run=cmd_up)

    versions = commands.add_parser("versions", help="list the published versions of the model")
    versions.set_defaults(run=cmd_versions)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"flywheel {args.command}: {error}")


if __name__ == "__main__":
    main()
