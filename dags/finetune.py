"""
### finetune__<project>

One DAG per text project (`kind: text` in `projects/<project>/params.yaml`).

LoRA or QLoRA fine-tuning of a pretrained transformers model, triggered from the UI's form.

* **check_params** refuses bad Params before any work: the base model must be on disk (a
  path, the packaged `all-MiniLM-L6-v2`, or a model id in the local Hugging Face cache), the
  target modules must be linear layers of it, the dataset must suit the task, and QLoRA must
  have 4-bit kernels that run here.
* **validate** checks a file landed in `landing/<project>/<dataset>.jsonl` with the format's
  Great Expectations suite; failing records go to `quarantine/finetune/` with the report.
* **version_data** tracks the dataset with DVC; **finetune** trains the adapters with Lightning
  (queue `gpu`: on a multi-machine deployment a GPU worker takes it).
* **export** merges the adapter and exports a classifier to ONNX with its tokenizer.
* **evaluate** scores it against the untuned base (a linear head on its embeddings) and the
  served champion on the same test records; **publish** serves a winner as a new version of
  the Triton ensemble (raw text in, label and scores out). A causal LM is evaluated by
  held-out loss against its base and kept as an adapter with its lineage.

All logic is in `pipelines.steps` and `pipelines.finetune`; this file only wires it.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from pipelines.config import GPU_QUEUE, ProjectKind, project_kinds, task_defaults


def finetune_dag(project: str):
    @dag(
        dag_id=f"finetune__{project}",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # one DVC operation at a time in the project's repository
        default_args=task_defaults(),
        tags=["flywheel", "training", "llm", f"project:{project}"],
        doc_md=__doc__,
        params={
            "base_model": Param("all-MiniLM-L6-v2", type="string", minLength=1, description="A directory, the packaged all-MiniLM-L6-v2, or a model id in the local Hugging Face cache."),
            "task": Param("sequence-classification", enum=["sequence-classification", "causal-lm"], description="Classify texts, or instruction-tune a causal LM."),
            "method": Param("lora", enum=["lora", "qlora"], description="qlora: the base in 4-bit nf4 (bitsandbytes) under the adapters."),
            "r": Param(8, type="integer", minimum=1, maximum=1024, description="LoRA rank."),
            "alpha": Param(16, type="number", exclusiveMinimum=0, description="LoRA alpha (scale alpha / r)."),
            "dropout": Param(0.05, type="number", minimum=0, exclusiveMaximum=1, description="LoRA dropout."),
            "target_modules": Param(
                ["query", "value"], type="array", items={"type": "string", "minLength": 1}, minItems=1,
                description="Linear layers that get adapters, e.g. query, value (BERT) or q_proj, v_proj (Llama).",
            ),
            "epochs": Param(2, type="integer", minimum=1, maximum=100),
            "learning_rate": Param(1e-3, type="number", exclusiveMinimum=0, maximum=1),
            "max_length": Param(128, type="integer", minimum=8, maximum=8192, description="Tokens a record is cut to."),
            "dataset": Param(
                "reviews", type="string", pattern=r"^[A-Za-z0-9_.-]+$",
                description="A dataset of the project: <dataset>.jsonl (text, Alpaca or chat records) landed in landing/<project>/.",
            ),
            "max_train_records": Param(None, type=["null", "integer"], minimum=8, description="Train on the first N training records only (a quick run)."),
        },
    )
    def finetune():
        from pipelines import steps

        @task
        def check_params(params=None):
            return steps.run(steps.finetune_check_params, project, dict(params))

        @task
        def validate(checked):
            return steps.run(steps.finetune_validate, project, checked["dataset"])

        @task
        def version_data(checked):
            return steps.run(steps.finetune_version_data, project, checked["dataset"])

        @task(queue=GPU_QUEUE)
        def train(checked, versioned, dag_run=None):
            return steps.run(steps.finetune_train, project, checked, versioned["data_version"], steps.airflow_run(dag_run))

        @task(queue=GPU_QUEUE)
        def export(trained):
            return steps.run(steps.finetune_export, project, trained["candidate"])

        @task
        def evaluate(trained, exported):
            return steps.run(steps.finetune_evaluate, project, trained["candidate"], exported["folder"])

        @task
        def publish(trained, exported, decision, versioned, dag_run=None):
            run = steps.airflow_run(dag_run)
            return steps.run(
                steps.finetune_publish, project, trained["candidate"], exported["folder"], decision, versioned["data_version"], run
            )

        checked = check_params()
        validated = validate(checked)
        versioned = version_data(checked)
        validated >> versioned
        trained = train(checked, versioned)
        exported = export(trained)
        decision = evaluate(trained, exported)
        publish(trained, exported, decision, versioned)

    return finetune()


for name, kind in project_kinds().items():
    if kind == ProjectKind.text:
        finetune_dag(name)
