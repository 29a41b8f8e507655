"""Create a TrainJob, follow it to the end and clean up: the launcher side of a cluster scale-out run.

Talks to the API server only through the `kubernetes` client's `CustomObjectsApi` (group
trainer.kubeflow.org, plural trainjobs) — no platform SDK — and takes the API object as an argument,
so tests drive it with a small fake that scripts the status sequence (tests/unit/test_trainjob_watch.py).

Policy (why each choice):
- **Idempotent create.** The job is named from the run id and stage (`trainjob_name`); a retried KFP
  task creates the same name, gets 409 AlreadyExists and *re-attaches* to the running (or finished)
  job instead of failing or starting a second copy that would race the first on the checkpoints.
- **A failed job from an earlier attempt is replaced**, not re-attached to: the retry exists to try
  again, and training resumes from the newest checkpoint under the run root. Its reason is logged.
- **Same name, other settings** (the LAUNCH_LABEL hash of the launch spec differs: a later pipeline run
  reusing the run id with new parameters): a finished job is replaced; a running one is an error —
  two trainings would race on the run's checkpoints.
- **Delete on success** (the outputs are in the run root; the pods only hold resources) and **on
  timeout** (nothing waits for it any more; it would hold GPUs). **Keep on failure**, so its pods'
  logs stay readable (`kubectl logs -l jobset.sigs.k8s.io/jobset-name=<name>`) until the next attempt
  of the same run replaces it. `keep="always"` keeps every job (debugging).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from amft_lib.run.trainjob import GROUP, PLURAL, VERSION, TrainJobError
from amft_lib.run.trainjob_logs import PodLogTail, last_error_line

log = logging.getLogger(__name__)

KEEP_POLICIES = ("on-failure", "always")
LAUNCH_LABEL = "amft.pipeline/launch-hash"
RBAC_HINT = "pipelines/rbac/trainjob-launcher.yaml"


class TrainJobFailed(TrainJobError):
    """The TrainJob reached Failed; the message carries its reason."""


class TrainJobTimeout(TrainJobError):
    """The TrainJob did not finish within the launcher's timeout (it was deleted)."""


def run_trainjob(api: Any, manifest: Mapping[str, Any], *, timeout_s: float, poll_s: float = 10.0,
                 keep: str = "on-failure", sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, logs: PodLogTail | None = None) -> dict[str, Any]:
    """Create (or re-attach to) the TrainJob `manifest`, log its status changes until it is Complete
    or Failed, apply the keep/delete policy, and return the last object read. With `logs`, the node-0
    pod's output follows the status into this process's log, and a failure shows each failed pod's
    last lines.

    Raises TrainJobFailed (one line: name, reason, message, the failed pod's last error line),
    TrainJobTimeout, or TrainJobError for an API error (403 names the RBAC file the pipeline's service
    account needs).
    """
    if keep not in KEEP_POLICIES:
        raise TrainJobError(f"keep={keep!r}: choose one of {', '.join(KEEP_POLICIES)}")
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    ref = f"trainjob {namespace}/{name}"
    job = _create_or_attach(api, manifest, ref, sleep)
    deadline = clock() + timeout_s
    seen: tuple = ()
    while True:
        state = job_state(job)
        observed = (state["conditions"], state["trainer"])
        if observed != seen:
            log.info("%s: %s", ref, describe_state(state))
            seen = observed
        if logs is not None:
            logs.poll()
        if state["phase"] == "Complete":
            if keep != "always":
                _delete(api, name, namespace, ref, "complete")
            return job
        if state["phase"] == "Failed":
            raise TrainJobFailed(f"{ref} failed: {state['reason'] or 'no reason given'}"
                                 f"{': ' + state['message'] if state['message'] else ''}"
                                 f"{failed_pods_report(logs)} (kept for its pod logs)")
        if clock() >= deadline:
            if keep != "always":
                _delete(api, name, namespace, ref, "timed out")
            raise TrainJobTimeout(f"{ref} did not finish within {timeout_s:.0f} s; deleted it (checkpoints stay "
                                  "under the run root: a retry resumes from them)")
        sleep(poll_s)
        job = _call(ref, "read", lambda: api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))


def failed_pods_report(logs: PodLogTail | None) -> str:
    """Print each failed pod's last lines; return "; <pod>: <its last error line>" for the first one."""
    if logs is None:
        return ""
    failed = logs.failed_pods()
    for pod, lines in failed:
        logs.emit(f"── last {len(lines)} lines of failed pod {pod} ──")
        for line in lines:
            logs.emit(f"[{pod}] {line}")
    return f"; {failed[0][0]}: {last_error_line(failed[0][1])}" if failed else ""


def job_state(job: Mapping[str, Any]) -> dict[str, Any]:
    """What the status says: `phase` (Complete, Failed or Running), the failing condition's `reason`
    and `message`, every condition as (type, status, reason), and trainerStatus if the runtime fills it."""
    status = job.get("status") or {}
    conditions = tuple((c.get("type"), c.get("status"), c.get("reason") or "") for c in status.get("conditions") or [])
    phase, reason, message = "Running", "", ""
    for c in status.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            phase, reason, message = c["type"], c.get("reason") or "", " ".join((c.get("message") or "").split())
    trainer = status.get("trainerStatus") or {}
    progress = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in trainer.items() if k != "lastUpdatedTime"))
    return {"phase": phase, "reason": reason, "message": message, "conditions": conditions, "trainer": progress}


def describe_state(state: Mapping[str, Any]) -> str:
    """One log line: the conditions, then the trainer's progress when the runtime reports it."""
    conditions = ", ".join(f"{t}={s}" + (f" ({r})" if r else "") for t, s, r in state["conditions"]) or "no conditions"
    trainer = dict(state["trainer"])
    parts = [conditions]
    if "progressPercentage" in trainer:
        parts.append(f"progress {trainer['progressPercentage']}%")
    if "estimatedRemainingSeconds" in trainer:
        parts.append(f"~{trainer['estimatedRemainingSeconds']} s left")
    if "metrics" in trainer:
        metrics = json.loads(trainer["metrics"])
        parts.append(" ".join(f"{m.get('name')}={m.get('value')}" for m in metrics))
    return "; ".join(parts)


def _create_or_attach(api: Any, manifest: Mapping[str, Any], ref: str,
                      sleep: Callable[[float], None]) -> dict[str, Any]:
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]

    def create() -> dict[str, Any]:
        return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(manifest))

    try:
        job = create()
        log.info("%s: created (%s nodes × %s processes)", ref, manifest["spec"]["trainer"].get("numNodes"),
                 manifest["spec"]["trainer"].get("numProcPerNode"))
        return job
    except Exception as exc:
        if _status(exc) != 409:
            raise _api_error(ref, "create", exc) from None
    job = _call(ref, "read", lambda: api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    state = job_state(job)
    ours = (manifest["metadata"].get("labels") or {}).get(LAUNCH_LABEL)
    theirs = ((job.get("metadata") or {}).get("labels") or {}).get(LAUNCH_LABEL)
    if ours and theirs != ours:
        if state["phase"] == "Running":
            raise TrainJobError(f"{ref} is running with other settings ({LAUNCH_LABEL} {theirs} ≠ {ours}): another "
                                "pipeline run with the same run id? Wait for it or delete it")
        log.warning("%s: left by a run with other settings (%s); replacing it", ref, state["phase"].lower())
    elif state["phase"] != "Failed":
        log.info("%s: exists from an earlier attempt (%s); re-attaching", ref, state["phase"].lower())
        return job
    else:
        log.warning("%s: an earlier attempt failed (%s); replacing it", ref, state["reason"] or "no reason given")
    _delete(api, name, namespace, ref, "replaced")
    # deletion is asynchronous (finalizers, child JobSet): create until the old object is gone
    for _ in range(60):
        try:
            return create()
        except Exception as exc:
            if _status(exc) != 409:
                raise _api_error(ref, "create", exc) from None
        sleep(1.0)
    raise TrainJobError(f"{ref}: the failed job from an earlier attempt was not removed within 60 s")


def _delete(api: Any, name: str, namespace: str, ref: str, why: str) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground")
        log.info("%s: deleted (%s)", ref, why)
    except Exception as exc:
        if _status(exc) != 404:  # already gone is fine; anything else is worth a line, not a failed stage
            log.warning("%s: could not delete (%s): %s", ref, why, _one_line(exc))


def _call(ref: str, op: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:
        raise _api_error(ref, op, exc) from None


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _api_error(ref: str, op: str, exc: BaseException) -> TrainJobError:
    status = _status(exc)
    hint = {403: f"the pipeline's service account may not {op} trainjobs: apply {RBAC_HINT}",
            404: "is Kubeflow Trainer v2 installed (CRD trainjobs.trainer.kubeflow.org)?",
            422: "the API server refused the manifest"}.get(status or 0, "")
    return TrainJobError(f"{ref}: {op} failed ({status or type(exc).__name__}: {_one_line(exc)})"
                         + (f"; {hint}" if hint else ""))


def _one_line(exc: BaseException) -> str:
    """The reason of a kubernetes ApiException (its body's `message` when JSON), else str(exc), on one line."""
    body = getattr(exc, "body", None)
    if body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError, TypeError):
            message = None
        if message:
            return " ".join(str(message).split())
    return " ".join((getattr(exc, "reason", None) or str(exc) or type(exc).__name__).split())
