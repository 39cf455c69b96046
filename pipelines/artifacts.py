"""The names of the artifact contract: files in candidate and version folders, and the tensors
a served model takes and gives. Every stage imports them from here, so export, evaluation and
serving agree on them without importing one another.
"""

from __future__ import annotations

# A tabular model's export (a candidate folder, then a version of the model repository).
MODEL_FILE = "model.onnx"  # raw columns in, `prediction` (and a classifier's `label`) out (the category lookup inside the graph)
LOOKUP_FILE = "lookup.onnx"  # its first half: category strings to int32 codes (ONNX Runtime)
NETWORK_FILE = "network.onnx"  # its second half: numbers only (what TensorRT builds an engine of)
PLAN_FILE = "model.plan"  # the TensorRT engine of network.onnx, where export.tensorrt built one
OUTPUT = "prediction"  # the output tensor of every tabular rendering
# A classifier's second output: int32, 1 where prediction >= the threshold chosen on the validation
# split (export.json["threshold"]), else 0. Versions exported before it have none.
LABEL_OUTPUT = "label"
# Each row's key, answered (string, shape (rows, 1)) and logged by the cpu rendering of a version
# that logs: the request's id (the client's or one the server made), ``<id>/<i>`` for row i of several.
REQUEST_ID = "request_id"
# During a rollout, the version that answered each row (int32, shape (rows, 1)), answered by the
# router (``backend/model.py``); also a column of every inference log.
MODEL_VERSION = "model_version"
CODES, NUMERIC = "categorical_codes", "numeric"  # the tensors between the lookup and the network

# A fine-tuned text classifier's export.
TOKENIZER_DIR = "tokenizer"
SERVING_FILE = "serving.json"  # max_length and labels, for the tokenizer step
INPUTS = ("input_ids", "attention_mask")  # between the tokenizer step and the classifier
SCORES, LABEL = "scores", "label"  # the ensemble's outputs
TEXT = "text"  # the ensemble's input, and the logged column of a text project
ADAPTER_DIR = "adapter"  # peft's save_pretrained of a fine-tuning candidate
CANDIDATE_FILE = "candidate.json"  # a fine-tuning candidate's inputs and training result

# The model repository and the drift check.
CONFIG_FILE = "config.pbtxt"
LINEAGE_FILE = "lineage.json"  # where a version came from
REFERENCE_FILE = "reference.parquet"  # a seeded sample of a version's training data: its drift reference
NULL_FILE = "drift_null.parquet"  # each monitored column's drift statistic under no drift, by window size
REPORT_FILE = "report.html"  # Evidently's report of one window
SUMMARY_FILE = "summary.json"  # a window's verdict, share and per-column tests
# A version's test split as its model.onnx scored it at publish (features, truth, prediction):
# what its production performance is compared with and estimated from (pipelines.feedback).
PERFORMANCE_REFERENCE_FILE = "performance_reference.parquet"

# Quarantine of a tabular batch.
RESULT_FILE = "validation_result.json"
DOCS_FILE = "data_docs.html"
LABEL_CHECK_FILE = "label_check.json"  # why the label check held a batch that passed validation (pipelines.data.label_check)
