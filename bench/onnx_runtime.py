"""Scoring speed of one trained flights model: ONNX Runtime fp32 and dynamic int8 against
PyTorch eager (the baseline), on the same real test rows, in one run. Every call starts from
the raw rows (a DataFrame), as a served request does.

The int8 model is ONNX Runtime's dynamic quantisation of the exported file (weights int8,
activations quantised on the fly); its metric is printed beside fp32's so the speed is not
read without the accuracy it costs.

    .venv/bin/python bench/onnx_runtime.py [--rows 4096] [--repeat 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time


def best_of(call, repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls (after one warm-up)."""
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()

    from project import exported_candidate, throwaway_project

    config = throwaway_project(["2013-01", "2013-02", "2013-03"])
    folder = exported_candidate()

    import onnxruntime as ort
    import pandas as pd
    import torch

    from pipelines.data.split import split_paths
    from pipelines.evaluation.gate import metrics
    from pipelines.export.onnx import MODEL_FILE, onnx_inputs
    from pipelines.export.quantize import quantize_file
    from pipelines.training.train import load_candidate

    int8 = quantize_file(folder / MODEL_FILE, folder / "model.int8.onnx")

    test = pd.read_parquet(split_paths(config)["test"])
    rows = test.head(args.rows)
    model, encoding = load_candidate(folder)
    torch.set_num_threads(os.cpu_count() or 1)

    def eager():
        # From raw rows, as served: the ONNX file does its category lookup inside the graph.
        categorical = torch.from_numpy(encoding.categorical_indices(rows))
        numeric = torch.from_numpy(encoding.numeric_values(rows))
        with torch.inference_mode():
            model.predict(categorical, numeric)

    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for name, path in (("fp32", folder / MODEL_FILE), ("int8", int8))}
    results = {"torch eager": best_of(eager, args.repeat)}
    for name, session in sessions.items():
        results[f"onnxruntime {name}"] = best_of(
            lambda s=session: s.run(None, onnx_inputs(rows, list(encoding.categorical), encoding.numeric)), args.repeat
        )

    truth = test[config.dataset.label.column].to_numpy()
    all_feeds = onnx_inputs(test, list(encoding.categorical), encoding.numeric)
    quality = {f"onnxruntime {n}": metrics(config.dataset.label.task, truth, s.run(None, all_feeds)[0][:, 0])[config.gate.metric] for n, s in sessions.items()}

    baseline = results["torch eager"]
    print(f"{args.rows} rows per call, best of {args.repeat}, CPU ({os.cpu_count()} cores); {config.gate.metric} on all {len(test)} test rows")
    print(f"{'':<18}{'ms/call':>9}{'rows/s':>12}{'vs eager':>10}{config.gate.metric:>10}")
    for name, seconds in results.items():
        score = f"{quality[name]:.4f}" if name in quality else "-"
        print(f"{name:<18}{seconds * 1000:>9.3f}{args.rows / seconds:>12.0f}{baseline / seconds:>9.2f}x{score:>10}")
    shutil.rmtree(config.home)


if __name__ == "__main__":
    main()
