"""
### rollout__<project>

Takes a promoted challenger from shadow to canary to full traffic, one stage at a time. The
retrain's publish routes a challenger that passed the offline gate in **shadow** beside the
served champion (the champion answers, the challenger's answers are logged) and emits the Asset
`flywheel://<project>/challenger_in_shadow`, which starts this DAG. Needs `rollout.enabled` in
the project's params.yaml (off, a promoted challenger serves in full at once).

* **shadow**: looks every `rollout.poke_seconds` at the labels that came back for requests
  served since the stage began, paired with the challenger's answers to the same requests,
  with a sequential test (mixture SPRT, always valid: looking often does not raise the false
  alarm rate `rollout.false_alarm_rate`). Promote: the challenger is not worse beyond
  `rollout.margin`; abort: it is worse, or undecided after `rollout.max_labels` rows or
  `rollout.stage_hours`.
* **canary**: the challenger answers `rollout.canary_share` of requests (sticky by request id);
  the same test again on this stage's labels.
* **full**: the challenger becomes the served version. **aborted**: the champion serves alone.
* With `rollout.approval: required`, a person approves before canary and before full in
  Airflow's **Required Actions** (the challenger's model card is linked); a rejection, or no
  answer within `rollout.approval_timeout_hours`, aborts.

Every change is a reload of the champion's config or a version switch: no request fails. Each
look, decision, approval and the traffic each version served are in the challenger's
`lineage.json` (`rollout`). An alert's rollback (`rollback__<project>` without a version) ends
a rollout in progress.

All logic is in `pipelines.steps`; this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

import pendulum
from airflow.configuration import conf
from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk import Asset, Param, PokeReturnValue, dag, task

from pipelines.config import ProjectKind, RolloutApproval, RolloutConfig, parsed_config, project_kinds, task_defaults
from pipelines.steps import CHALLENGER_IN_SHADOW, project_asset

APPROVE, REJECT = "Approve", "Reject"
# Behind a proxy Airflow may be served under a path ([api] base_url): the card's link carries it.
ROOT = urlsplit(conf.get("api", "base_url", fallback="") or "/").path.rstrip("/")
RESPONSE = ("chosen_options", "params_input", "responded_at", "responded_by_user")


class ApprovalBranch(HITLBranchOperator):
    """The standard provider's human-in-the-loop branch, keeping the response (choice, comment,
    who, when) as its XCom ``approval`` for the challenger's lineage: the branch's own return
    value is only the task it chose."""

    def execute_complete(self, context, event):
        response = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in event.items() if k in RESPONSE}
        context["ti"].xcom_push(key="approval", value=response)
        return super().execute_complete(context, event)


def rollout_dag(project: str):
    parsed = parsed_config(project)
    rollout = parsed.rollout if parsed else RolloutConfig()
    look_for = {"poke_interval": rollout.poke_seconds, "timeout": rollout.stage_hours * 3600 + 10 * rollout.poke_seconds, "mode": "reschedule"}

    @dag(
        dag_id=f"rollout__{project}",
        schedule=Asset(project_asset(project, CHALLENGER_IN_SHADOW)),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # one rollout at a time: the served model routes one challenger
        default_args=task_defaults(retries=1, retry_delay=timedelta(seconds=30), max_retry_delay=None),
        tags=["flywheel", "serving", f"project:{project}"],
        doc_md=__doc__,
        params={"version": Param(None, type=["null", "integer"], minimum=1, description="The challenger in shadow (default: the one the served model routes).")},
    )
    def rollout_run():
        from pipelines import steps

        @task
        def challenger(params=None, triggering_asset_events=None):
            events = [{"asset": e.asset.uri, "extra": e.extra} for events in (triggering_asset_events or {}).values() for e in events]
            return steps.run(steps.rollout_challenger, project, params["version"], events)

        @task.sensor(**look_for)
        def shadow(begun):
            look = steps.run(steps.rollout_look, project, begun["challenger"], "shadow")
            return PokeReturnValue(is_done=look["decision"] != "continue", xcom_value=look)

        @task.sensor(**look_for)
        def canary_look(begun):
            look = steps.run(steps.rollout_look, project, begun["challenger"], "canary")
            return PokeReturnValue(is_done=look["decision"] != "continue", xcom_value=look)

        @task
        def card(begun, looks):
            return steps.run(steps.rollout_card, project, begun["challenger"], looks)

        def after(look_task: str, promote_to: str):
            @task.branch(task_id=f"after_{look_task}")
            def decide(look):
                return promote_to if look["decision"] == "promote" else ("abort" if look_task == "shadow" else "abort_canary")

            return decide

        def approval(task_id: str, to: str, rejected: str):
            return ApprovalBranch(
                task_id=task_id,
                subject=f"{project}: take version {{{{ ti.xcom_pull(task_ids='challenger')['challenger'] }}}} to {to}?",
                body=(
                    f"The sequential test of the last stage promoted the challenger. Read its model card first: "
                    f"[{ROOT}/flywheel/projects/{project}/versions/{{{{ ti.xcom_pull(task_ids='challenger')['challenger'] }}}}/card]"
                    f"({ROOT}/flywheel/projects/{project}/versions/{{{{ ti.xcom_pull(task_ids='challenger')['challenger'] }}}}/card).\n\n"
                    f"Rejecting, or no answer within {rollout.approval_timeout_hours:g} h, aborts: the champion serves alone."
                ),
                options=[APPROVE, REJECT],
                options_mapping={APPROVE: to, REJECT: rejected},
                defaults=[REJECT],
                params={"comment": Param("", type="string", maxLength=1000, description="Why (goes into the version's lineage).")},
                response_timeout=timedelta(hours=rollout.approval_timeout_hours),
            )

        @task
        def canary(begun, look, ti=None, dag_run=None):
            approval = steps.approval_record(ti.xcom_pull(task_ids="approve_canary", key="approval"))
            return steps.run(steps.rollout_advance, project, begun["challenger"], "canary", steps.airflow_run(dag_run), look["reason"], approval)

        @task
        def full(begun, look, ti=None, dag_run=None):
            approval = steps.approval_record(ti.xcom_pull(task_ids="approve_full", key="approval"))
            return steps.run(steps.rollout_advance, project, begun["challenger"], "full", steps.airflow_run(dag_run), look["reason"], approval)

        def abort(task_id: str, look_task: str, approval_task: str | None = None):
            # One abort per decision point: a branch skips the paths it does not take, so a task
            # shared by two branches would be skipped by the first before the second could take it.
            @task(task_id=task_id)
            def aborted(begun, ti=None, dag_run=None):
                look = ti.xcom_pull(task_ids=look_task)
                approval = steps.approval_record(ti.xcom_pull(task_ids=approval_task, key="approval")) if approval_task else None
                reason = f"not approved: {approval['summary']}" if approval else look["reason"]
                return steps.run(steps.rollout_advance, project, begun["challenger"], "aborted", steps.airflow_run(dag_run), reason, approval)

            return aborted(begun)

        begun = challenger()
        shadow_look = shadow(begun)
        canaried = canary(begun, shadow_look)
        canary_looked = canary_look(begun)
        finished = full(begun, canary_looked)
        approved = rollout.approval == RolloutApproval.required
        shadow_branch = after("shadow", "approve_canary" if approved else "canary")(shadow_look)
        canary_branch = after("canary_look", "approve_full" if approved else "full")(canary_looked)
        card.override(task_id="shadow_card")(begun, [shadow_look]) >> shadow_branch
        card.override(task_id="canary_card")(begun, [shadow_look, canary_looked]) >> canary_branch
        shadow_branch >> abort("abort", "shadow")
        canary_branch >> abort("abort_canary", "canary_look")
        if approved:
            approve_canary, approve_full = approval("approve_canary", "canary", "abort_before_canary"), approval("approve_full", "full", "abort_before_full")
            shadow_branch >> approve_canary >> [canaried, abort("abort_before_canary", "shadow", "approve_canary")]
            canary_branch >> approve_full >> [finished, abort("abort_before_full", "canary_look", "approve_full")]
        else:
            shadow_branch >> canaried
            canary_branch >> finished
        canaried >> canary_looked

    return rollout_run()


for name, kind in project_kinds().items():
    if kind == ProjectKind.tabular:
        rollout_dag(name)
