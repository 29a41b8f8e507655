"""Waiting for a KFP run without holding a worker slot: a deferrable operator and its trigger.

A retraining runs for hours. The task that waits for it (`WaitForKfpRun`) only defers: the worker
slot is free at once and the triggerer's event loop polls the KFP API (`KfpRunTrigger`, one small
GET per interval, in a thread so the loop never blocks). What makes it re-attach after a scheduler,
triggerer or worker restart: `submit` pushes the KFP run id (and when it submitted) to XCom before
this task starts, and the trigger is stored in Airflow's database as its classpath and kwargs (run
id, connection *id*, deadline) — never a token — so a restarted triggerer rebuilds it and keeps
polling the same run. The deadline is fixed at submit time, so a retried wait gets no fresh timeout.

When the deadline passes, the task terminates the KFP run (POST …/runs/{id}:terminate) and fails:
the cluster stops spending GPUs on a run nobody waits for any more. The same happens when a person
acts on the waiting task — marks it failed or succeeded, clears it, or fails its DAG run — through
the trigger's `on_kill` (Airflow ≥ 3.3 calls it on a user's action only, never on a triggerer restart
or redistribution, so a rolling deploy of the triggerers cannot cancel a training). The DAG param
`terminate_on_kill` turns that off for teams that mark the wait succeeded to stop *watching* a run.

The triggerer imports this module by its classpath (`amft_kfp_wait.KfpRunTrigger`): keep it beside
the DAG file, in a folder on the triggerer's PYTHONPATH (the DAG folder is, on a default install).
"""

import asyncio
import datetime as dt
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

try:
    import amft_kfp
except ModuleNotFoundError:  # imported from outside the DAG folder (tests, a wrapper DAG file)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import amft_kfp

log = logging.getLogger(__name__)
TIMEOUT, DONE = "timeout", "done"


def _client(conn_id: str) -> Any:
    from airflow.sdk import Connection

    return amft_kfp.kfp_client(amft_kfp.kfp_target(Connection.get(conn_id)))


class KfpRunTrigger(BaseTrigger):
    """Polls KFP run `kfp_run_id` every `poll_interval_s` until it ends (event status "done", with
    its state and reason) or `deadline` (epoch seconds) passes (status "timeout"). A failed poll
    (API down, 5xx) is logged and retried at the next interval: an outage is not the run's end."""

    def __init__(self, kfp_run_id: str, conn_id: str, poll_interval_s: float = 60.0, deadline: float = 0.0,
                 name: str = "", terminate_on_kill: bool = True) -> None:
        super().__init__()
        self.kfp_run_id, self.conn_id, self.name = kfp_run_id, conn_id, name
        self.poll_interval_s, self.deadline = float(poll_interval_s), float(deadline)
        self.terminate_on_kill = bool(terminate_on_kill)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.KfpRunTrigger", {"kfp_run_id": self.kfp_run_id, "conn_id": self.conn_id,
                                               "poll_interval_s": self.poll_interval_s, "deadline": self.deadline,
                                               "name": self.name, "terminate_on_kill": self.terminate_on_kill})

    async def on_kill(self) -> None:
        """A person stopped waiting (failed, cleared or marked succeeded the task, or failed the DAG run):
        terminate the KFP run, unless it already ended or `terminate_on_kill` is off. Bounded below the
        triggerer's own on_kill limit (30 s by default) so a hung API cannot hold the event loop's slot."""
        if not self.terminate_on_kill:
            log.info("KFP run %s (%s): the wait was stopped by a user; the run keeps going (terminate_on_kill "
                     "is off)", self.name, self.kfp_run_id)
            return
        state = await asyncio.wait_for(asyncio.to_thread(
            lambda: amft_kfp.terminate(_client(self.conn_id), self.kfp_run_id)), timeout=20)
        log.warning("KFP run %s (%s): the wait was stopped by a user; %s", self.name, self.kfp_run_id,
                    f"it had already ended ({state})" if state in amft_kfp.FINAL_STATES else "terminated it")

    def _poll(self) -> tuple[str, str]:
        return amft_kfp.run_state(_client(self.conn_id), self.kfp_run_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        state = ""
        while True:
            try:
                state, reason = await asyncio.to_thread(self._poll)
            except Exception as exc:  # the API, not the run: keep waiting (the deadline still holds)
                log.warning("KFP run %s: poll failed (%s); retrying in %.0f s", self.kfp_run_id,
                            " ".join(str(exc).split())[:300], self.poll_interval_s)
            else:
                if state in amft_kfp.FINAL_STATES:
                    yield TriggerEvent({"status": DONE, "state": state, "reason": reason})
                    return
                log.info("KFP run %s (%s): %s", self.name, self.kfp_run_id, state or "no state yet")
            left = self.deadline - time.time() if self.deadline else self.poll_interval_s
            if left <= 0:
                yield TriggerEvent({"status": TIMEOUT, "state": state, "reason": ""})
                return
            await asyncio.sleep(min(self.poll_interval_s, left))


class WaitForKfpRun(BaseOperator):
    """Defer until the KFP run in `handle` (submit's XCom) ends; returns {"state", "reason"}. On the
    deadline (`wait_timeout_s` after submit) it terminates the run and fails. A local-mode handle
    (run-local already finished inside submit) returns at once."""

    template_fields = ("handle",)

    def __init__(self, *, handle: Any, poll_interval_s: float = 60.0, wait_timeout_s: float = 48 * 3600.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.handle, self.poll_interval_s, self.wait_timeout_s = handle, poll_interval_s, wait_timeout_s

    def execute(self, context: Any) -> dict[str, str]:
        handle = self.handle
        if handle["mode"] != "kfp":
            return {"state": handle["state"], "reason": ""}
        deadline = float(handle.get("submitted_at") or time.time()) + self.wait_timeout_s
        log.info("deferring: waiting for KFP run %s (%s) until %s", handle["name"], handle["kfp_run_id"],
                 dt.datetime.fromtimestamp(deadline, dt.UTC).isoformat(timespec="seconds"))
        params = context["params"]
        self.defer(trigger=KfpRunTrigger(handle["kfp_run_id"], params["kfp_conn_id"], self.poll_interval_s, deadline,
                                         handle["name"], params.get("terminate_on_kill", True)),
                   method_name="execute_complete")

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, str]:
        if event["status"] == TIMEOUT:
            from airflow.sdk.exceptions import AirflowFailException

            handle = self.handle
            state = amft_kfp.terminate(_client(context["params"]["kfp_conn_id"]), handle["kfp_run_id"])
            raise AirflowFailException(f"KFP run {handle['name']} ({handle['kfp_run_id']}) did not finish within "
                                       f"{self.wait_timeout_s:.0f} s of its submission (it was {state or 'pending'}); "
                                       "terminated it")
        return {"state": event["state"], "reason": event["reason"]}
