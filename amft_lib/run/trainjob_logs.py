"""Follow a TrainJob's training output from the launching task: the node-0 pod's log (where torchrun's
rank 0 prints progress, metrics and the run summary) copied into the KFP component log as it grows,
and on failure the last lines of every failed pod, so the reason a job died is in the KFP UI instead of
behind `kubectl logs`.

Reads only through `CoreV1Api.list_namespaced_pod` and `read_namespaced_pod_log` (RBAC: pods `list`,
pods/log `get`; pipelines/rbac/trainjob-launcher.yaml). Polling, not `follow=True`: the watcher already
polls the TrainJob, a pod can be replaced mid-run (a restarted node), and a stuck stream must never hold
the launcher. Each read asks for the seconds since the previous one (plus a margin) with timestamps,
and lines before the last one printed (or among those sharing its timestamp, already printed) are
dropped, so nothing is printed twice and a long run
costs one short read per poll. Reading logs is best effort: no error here ever fails the stage.

Pods are found by the labels JobSet puts on them (the TrainJob's JobSet has the TrainJob's name; the
torch runtime's replicated job is `node`, pod index = node rank).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
NODE_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
NODE_JOB, CONTAINER = "node", "node"
FIRST_READ_LINES = 200  # re-attaching to a long-running job shows its recent output, not all of it
FAILED_POD_LINES = 30
MARGIN_S = 5


def last_error_line(lines: Sequence[str]) -> str:
    """The most telling line of a failed run's output: the last `error: …` line the CLI printed, else
    the last exception line of a traceback (`XError: …`), else the last non-empty line."""
    stripped = [ln.strip() for ln in lines if ln.strip()]
    for prefix_match in (lambda s: s.lower().startswith("error:") or "] error:" in s.lower(),
                         lambda s: "Error:" in s or "Exception:" in s):
        found = [s for s in stripped if prefix_match(s)]
        if found:
            return found[-1]
    return stripped[-1] if stripped else "no output"


class PodLogTail:
    """The node-0 pod's new log lines on every `poll()`, passed to `emit` prefixed with the pod's name."""

    def __init__(self, core: Any, namespace: str, job_name: str, *, emit: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.core, self.namespace, self.job_name = core, namespace, job_name
        self.emit = emit or (lambda line: print(line, flush=True))
        self.clock = clock
        self.pod = ""  # the pod followed now (a replaced pod starts over)
        self.last = ""  # RFC 3339 timestamp of the last line printed from it
        self.at_last = 0  # how many printed lines carry exactly that timestamp (lines can share one)
        self.read_at = 0.0
        self.disabled = False
        self._warned: set[str] = set()

    def poll(self) -> None:
        """Print the node-0 pod's lines written since the last poll."""
        if self.disabled:
            return
        pods = self._pods(f"{JOBSET_LABEL}={self.job_name},{REPLICATED_JOB_LABEL}={NODE_JOB},{NODE_INDEX_LABEL}=0")
        if not pods:
            return
        pod = newest(pods)
        name = pod.metadata.name
        if name != self.pod:
            if self.pod:
                self.emit(f"[{name}] (node 0 now runs in a new pod)")
            self.pod, self.last, self.at_last = name, "", 0
        now = self.clock()
        kwargs: dict[str, Any] = {"timestamps": True}
        if self.last:
            kwargs["since_seconds"] = max(1, int(now - self.read_at) + MARGIN_S)
        else:
            kwargs["tail_lines"] = FIRST_READ_LINES
        text = self._read(name, **kwargs)
        if text is None:
            return
        self.read_at = now
        seen_at_last = 0  # lines stamped `last` in this read; the first `at_last` of them were printed before
        for stamp, line in split_timestamps(text):
            if stamp and self.last and stamp < self.last:
                continue
            if stamp and stamp == self.last:
                seen_at_last += 1
                if seen_at_last <= self.at_last:
                    continue
                self.at_last += 1
            elif stamp:
                self.last, self.at_last, seen_at_last = stamp, 1, 1
            self.emit(f"[{name}] {line}")

    def failed_pods(self) -> list[tuple[str, list[str]]]:
        """(pod name, last lines) of every pod of the job that failed, node order, for the failure report."""
        if self.disabled:
            return []
        out = []
        pods = [p for p in self._pods(f"{JOBSET_LABEL}={self.job_name}") if (p.status.phase or "") == "Failed"]
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            text = self._read(pod.metadata.name, tail_lines=FAILED_POD_LINES)
            if text is not None:
                out.append((pod.metadata.name, [line for _, line in split_timestamps(text, stamped=False)]))
        return out

    def _pods(self, selector: str) -> list[Any]:
        try:
            return list(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items or [])
        except Exception as exc:  # best effort: a log we cannot read never fails the stage
            self._trouble("list pods", exc)
            return []

    def _read(self, pod: str, **kwargs: Any) -> str | None:
        try:
            return self.core.read_namespaced_pod_log(pod, self.namespace, container=CONTAINER, **kwargs)
        except Exception as exc:
            self._trouble(f"read the log of {pod}", exc)
            return None

    def _trouble(self, what: str, exc: BaseException) -> None:
        status = getattr(exc, "status", None)
        if status == 403:
            self.disabled = True
            log.warning("cannot %s (403): the pipeline's service account needs pods list and pods/log get "
                        "(pipelines/rbac/trainjob-launcher.yaml); following the TrainJob's status only", what)
        elif status in (400, 404):
            return  # the container is not started yet, or the pod is gone: the next poll tries again
        elif what not in self._warned:
            self._warned.add(what)
            log.warning("cannot %s: %s (will keep trying)", what, " ".join(str(exc).split())[:200])


def newest(pods: list[Any]) -> Any:
    """The most recently created pod (a restarted node gets a new one)."""
    return max(pods, key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))


def split_timestamps(text: str, stamped: bool = True) -> list[tuple[str, str]]:
    """(timestamp, line) pairs of a pod log read with `timestamps=True` (each line starts with an
    RFC 3339 time and a space); without timestamps every line gets "". Fractional seconds are padded
    to nanoseconds so the strings order as times do."""
    pairs = []
    for raw in text.splitlines():
        stamp, sep, line = raw.partition(" ")
        if stamped and sep and stamp[:4].isdigit() and "T" in stamp:
            pairs.append((pad_nanoseconds(stamp), line))
        else:
            pairs.append(("", raw))
    return pairs


def pad_nanoseconds(stamp: str) -> str:
    """2026-12-02T20:00:01.5Z → 2026-12-02T20:00:01.500000000Z (the API trims trailing zeros)."""
    body = stamp.rstrip("Z")
    seconds, _, fraction = body.partition(".")
    return f"{seconds}.{fraction.ljust(9, '0')[:9]}Z"
