"""Scoring speed of one trained flights model: ONNX Runtime fp32 and dynamic int8 against
PyTorch eager (the baseline), on the same real test rows, in one run. Every call starts from
the raw rows (a DataFrame), as a served request does.

The int8 model is ONNX Runtime's dynamic quantisation of the exported file (weights int8,
activations quantised on the fly); its metric is printed beside fp32's so the speed is not
read without the accuracy it costs.

    .venv/bin/python bench/onnx_runtime.py [--rows 4096] [--repeat 50] [--quick]

``--quick``: one month of 2,000 flights, one epoch, at most 256 rows a call, best of 5; the
same code paths, for tests/bench.
"""

from __future__ import annotations

import argparse
import os
import time


def best_of(call, repeat: int, warmup_s: float = 0.5) -> float:
    """Seconds of the fastest of ``repeat`` calls, after untimed ones for ``warmup_s`` (at least
    one): torch's first eager calls are several times slower than the rest."""
    until = time.perf_counter() + warmup_s
    call()
    while time.perf_counter() < until:
        call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="rows a call (default 4096; --quick: 256); at most the test split")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls of each, the fastest printed (default 50; --quick: 5)")
    parser.add_argument("--quick", action="store_true", help="small data, few repeats: a check that the benchmark runs")
    args = parser.parse_args()
    rows_per_call = args.rows or (256 if args.quick else 4096)
    repeat = args.repeat or (5 if args.quick else 50)
    months, landed, max_epochs = (["2013-01"], 2000, 1) if args.quick else (["2013-01", "2013-02", "2013-03"], None, None)

    from project import QUICK_NOTE, exported_candidate, print_ratio, throwaway_project

    with throwaway_project(months, landed) as config:
        folder = exported_candidate(config, max_epochs)

        import onnxruntime as ort
        import pandas as pd
        import torch

        from pipelines.artifacts import MODEL_FILE
        from pipelines.data.split import split_paths
        from pipelines.evaluation.gate import metrics
        from pipelines.export.onnx import onnx_inputs
        from pipelines.export.quantize import quantize_file
        from pipelines.training.train import load_candidate

        int8 = quantize_file(folder / MODEL_FILE, folder / "model.int8.onnx")

        test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
        rows = test.head(rows_per_call)
        model, encoding = load_candidate(folder)
        torch.set_num_threads(os.cpu_count() or 1)

        def eager():
            # From raw rows, as served: the ONNX file does its category lookup inside the graph.
            categorical = torch.from_numpy(encoding.categorical_indices(rows))
            numeric = torch.from_numpy(encoding.numeric_values(rows))
            with torch.inference_mode():
                model.predict(categorical, numeric)

        sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for name, path in (("fp32", folder / MODEL_FILE), ("int8", int8))}
        results = {"torch eager": best_of(eager, repeat)}
        for name, session in sessions.items():
            results[f"onnxruntime {name}"] = best_of(
                lambda s=session: s.run(None, onnx_inputs(rows, list(encoding.categorical), encoding.numeric)), repeat
            )

        truth = test[config.dataset.label.column].to_numpy()
        all_feeds = onnx_inputs(test, list(encoding.categorical), encoding.numeric)
        quality = {f"onnxruntime {n}": metrics(config.dataset.label.task, truth, s.run(None, all_feeds)[0][:, 0])[config.gate.metric] for n, s in sessions.items()}

    baseline = results["torch eager"]
    print(f"{len(rows)} rows per call, best of {repeat}, CPU ({os.cpu_count()} cores); {config.gate.metric} on all {len(test)} test rows")
    print(f"{'':<18}{'ms/call':>9}{'rows/s':>12}{'vs eager':>10}{config.gate.metric:>10}")
    for name, seconds in results.items():
        score = f"{quality[name]:.4f}" if name in quality else "-"
        print(f"{name:<18}{seconds * 1000:>9.3f}{len(rows) / seconds:>12.0f}{baseline / seconds:>9.2f}x{score:>10}")
    if args.quick:
        print(QUICK_NOTE)
    for name in sessions:
        print_ratio(f"onnxruntime {name} speed / torch eager speed", baseline / results[f"onnxruntime {name}"])


if __name__ == "__main__":
    main()
