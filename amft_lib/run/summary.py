"""What a run did, read back from its run root: the run summary (the exit handler's artifact,
`run-local`'s closing print, what Airflow puts in XCom) and the lineage record the register stage
writes. Readers never raise for a missing or unreadable record: a failed run has few.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from amft_lib.reports import fmt as _fmt
from amft_lib.run.layout import RunError, RunRoot


def write_run_lineage(run: RunRoot) -> str:
    """Build the lineage record of a run from what its stages left under the run root and write it
    to `lineage.json` there (the registry then adds its name/version, and :func:`record_registry_copy`
    the registered artifacts). Returns the URI.

    Besides the data it hashes every file that makes the model (lineage.describe_inputs: sha256 and
    size per file, symlinks out and devices refused): the trained model, the warm-start model it
    started from, both stage configs and the evaluation metrics the blessing read."""
    import yaml

    from amft_lib import lineage, storage
    from amft_lib.evaluate import load_metrics

    warm_cfg = yaml.safe_load(storage.get_bytes(run.warm_start_config))
    gate = read_json(run.gate)
    record = lineage.build_lineage(
        run.run_id,
        config={"warm_start": warm_cfg, "train": lineage.read_run_config(run.train)},
        inputs=lineage.describe_inputs("dataset", run.data),
        objects=[*lineage.describe_inputs("model", run.model),
                 *lineage.describe_inputs("warm_start_model", run.warm_start_model),
                 *lineage.describe_inputs("train_config", storage.join(run.train, "config.yaml")),
                 *lineage.describe_inputs("warm_start_config", run.warm_start_config),
                 *lineage.describe_inputs("eval_metrics", run.eval_metrics)],
        run_root=run.uri,
        validation={"passed": gate.get("passed"), "statistics": gate.get("statistics")},
        base_model={"id": warm_cfg["model"]["name"], "uri": run.base_model,
                    "source": _read_optional(run.base_model_source)},
        warm_start=_tag_safe({**read_json(run.warm_start_stats), "model_uri": run.warm_start_model}),
        checkpoints=lineage.find_checkpoints(run.uri),
        mu_summary=lineage.summarize_mu(lineage.mu_trajectory(run.train)),
        eval_metrics=load_metrics(run.eval),
    )
    return lineage.write_lineage(record, run.lineage)


def record_registry_copy(lineage_uri: str | None, result: Any, tracking_uri: str | None) -> bool:
    """After registration: hash the registered version's MLflow artifacts (what @champion serves)
    into the lineage record as `registry_model`, re-sign and write it, and replace the copy logged in
    the registry run with it. Returns whether the record changed.

    Idempotent: a record that already holds the registry copy is left alone — re-hashing on a retry
    would bless whatever the artifacts hold by then.
    """
    from amft_lib import lineage, registry, storage

    if not lineage_uri or not getattr(result, "registered", False) or not result.version:
        return False
    file_uri = lineage_uri if lineage_uri.endswith(".json") else storage.join(lineage_uri, lineage.LINEAGE_FILE)
    record = lineage.read_lineage(file_uri)
    if any(e.get("name") == lineage.REGISTRY_OBJECT for e in record.get("objects") or []):
        return False
    ref = registry.resolve(f"{result.name}:{result.version}", tracking_uri)
    with registry.registered_artifacts(ref, tracking_uri) as (folder, location):
        entries = lineage.describe_inputs(lineage.REGISTRY_OBJECT, folder)
    for entry in entries:  # a downloaded copy is recorded where the registry keeps it
        entry.update(uri=storage.join(location, entry["path"]), group=location)
    record["objects"] = [*(record.get("objects") or []), *entries]
    lineage.write_lineage(record, file_uri)
    with tempfile.TemporaryDirectory(prefix="amft-lineage-") as tmp:  # the registry run's copy, replaced
        local = os.path.join(tmp, lineage.LINEAGE_FILE)
        storage.get_file(file_uri, local)
        registry.get_client(tracking_uri).log_artifact(ref.run_id, local, artifact_path="lineage")
    return True


def _read_optional(uri: str) -> Any:
    """A record older runs may not have: None when it is absent."""
    from amft_lib import storage

    try:
        return read_json(uri)
    except storage.ObjectNotFoundError:
        return None


def read_json(uri: str) -> Any:
    """One JSON record from the run root (or anywhere storage reaches)."""
    import json

    from amft_lib import storage

    return json.loads(storage.get_bytes(uri).decode("utf-8"))


def _tag_safe(obj: Any) -> Any:
    """Keys MLflow accepts as tag names (the registry flattens warm-start stats into tags, and
    acceptance buckets are named like `easy(>10)`); values are left alone."""
    if isinstance(obj, Mapping):
        return {re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(k)): _tag_safe(v) for k, v in obj.items()}
    return obj


def summarize_run(s3_root: str, run_id: str, job_id: str, state: str, error: str = "") -> dict[str, Any]:
    """What happened in a run, from the stage records under its run root: data, gate, warm start,
    training, evaluation (base / warm start / final accuracy), registration and lineage. Never
    raises for a missing or unreadable record (a failed run has few); `problems` lists them."""
    from amft_lib import lineage, storage

    summary: dict[str, Any] = {"run_id": run_id or job_id, "state": state, "error": lineage.redact_text(error or ""),
                               "stages": {}, "accuracy": {}, "problems": []}
    try:
        run = RunRoot.resolve(s3_root, run_id, job_id)
    except RunError as exc:
        summary["problems"].append(str(exc))
        return summary
    summary.update(run_id=run.run_id, run_root=run.uri)

    def read(uri: str) -> Any:
        try:
            return read_json(uri)
        except storage.ObjectNotFoundError:
            return None
        except Exception as exc:  # unreadable: note it and carry on
            rel = uri[len(run.uri):].lstrip("/")
            summary["problems"].append(f"{rel}: {lineage.redact_text(' '.join(str(exc).split()))}")
            return None

    stages = summary["stages"]
    card = read(run.data_card)
    if card:
        stages["data"] = {"uri": run.data,
                          "rows": {k: v.get("rows") for k, v in (card.get("splits") or {}).items()}}
    gate = read(run.gate)
    if gate:
        stages["validation"] = {"passed": gate.get("passed"), "failed_checks": gate.get("failed_checks"),
                                "report": run.path("validation", "report.md")}
    ws = read(run.warm_start_stats)
    if ws:
        rs = ws.get("rejection_sampling") or {}
        stages["warm_start"] = {"acceptance_rate": rs.get("acceptance_rate"), "pass_at_k": rs.get("pass_at_k"),
                                "target_entropy": ws.get("target_entropy"), "val_accuracy": ws.get("val_accuracy"),
                                "kept_model": ws.get("kept_model"), "model": run.warm_start_model}
    train = read(run.train_result)
    if train:
        stages["train"] = {**train, "model": run.model, "checkpoints": run.path("checkpoints")}
    metrics = read(run.eval_metrics)
    if metrics:
        stages["eval"] = {"blessed": metrics.get("blessed"), "reason": metrics.get("reason"),
                          "report": run.path("eval", "report.html")}
        roles = {"base": (metrics.get("comparisons") or {}).get("base"),
                 "warm_start": (metrics.get("comparisons") or {}).get("warm_start"),
                 "final": metrics,
                 "champion": (metrics.get("comparisons") or {}).get("champion")}
        for role, block in roles.items():
            if not isinstance(block, Mapping):
                continue
            summary["accuracy"][role] = {
                split: {"accuracy": block[split].get("accuracy"), "pass_at_k": block[split].get("pass_at_k"),
                        "n": block[split].get("n")}
                for split in ("test_id", "test_ood") if isinstance(block.get(split), Mapping)
            }
        summary["changes"] = stage_changes(metrics.get("changes"))
    reg = read(run.registry)
    if reg:
        stages["register"] = reg
    if storage_exists(run.lineage):
        stages["lineage"] = {"uri": run.lineage}
        if reg and reg.get("registered"):
            # a local run (`amft pipeline run-local`) names its state dir: the registry and S3 live there
            local = f" --state-dir {os.environ['AMFT_STATE_DIR']}" if os.environ.get("AMFT_STATE_DIR") else ""
            stages["lineage"]["command"] = f"amft lineage {reg.get('name')}:{reg.get('version')}{local} --verify"
    summary["finished_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return summary


def storage_exists(uri: str) -> bool:
    """storage.exists that answers False (not an exception) when S3 cannot be reached."""
    from amft_lib import storage

    try:
        return storage.exists(uri)
    except storage.StorageError:
        return False


# what each stage did, in run order: (from, to) roles of metrics.json's `changes`, and the row title
STAGE_CHANGES = (("base", "warm_start", "warm start (base → warm start)"),
                 ("warm_start", "candidate", "training (warm start → final)"),
                 ("base", "candidate", "whole pipeline (base → final)"))


def stage_changes(changes: Any) -> list[dict[str, Any]]:
    """The greedy-accuracy records of metrics.json's `changes` for STAGE_CHANGES, in that order
    (champion → final is the blessing's business and stays in the evaluation report)."""
    if not isinstance(changes, list):
        return []
    wanted = [(a, b) for a, b, _ in STAGE_CHANGES]
    picked = [c for c in changes if isinstance(c, Mapping) and c.get("field") == "accuracy"
              and (c.get("from"), c.get("to")) in wanted]
    return sorted(picked, key=lambda c: (wanted.index((c["from"], c["to"])), c.get("split", "")))


def _change_cell(change: Mapping[str, Any] | None) -> str:
    if not change:
        return "–"
    return (f"{change['diff']:+.3f} [{change['lo']:+.3f}, {change['hi']:+.3f}] "
            f"{'**' + change['verdict'] + '**' if change['verdict'] != 'no significant change' else change['verdict']}")


def changes_table(changes: list[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: one per stage, the paired change in greedy accuracy on test_id and test_ood with
    its 95 % interval and the verdict in words ("no significant change" when the interval holds 0)."""
    if not changes:
        return []
    lines = ["What each stage changed (greedy accuracy, after − before on the same instances, 95 % paired-bootstrap "
             "interval):", "", "| stage | test_id | test_ood |", "|---|---|---|"]
    for before, after, title in STAGE_CHANGES:
        cells = {c["split"]: c for c in changes if (c["from"], c["to"]) == (before, after)}
        if cells:
            lines.append(f"| {title} | {_change_cell(cells.get('test_id'))} | {_change_cell(cells.get('test_ood'))} |")
    return lines


def verdict_reason(reason: Any) -> str:
    """The blessing reason without its leading "blessed: " / "not blessed: " (the summary line says it)."""
    text = str(reason or "")
    for prefix in ("not blessed: ", "blessed: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def accuracy_table(accuracy: Mapping[str, Any]) -> list[str]:
    """Markdown rows: one per model role, accuracy (pass@1) and pass@k on ID and OOD test splits."""
    lines = ["| model | test_id acc | test_id pass@k | test_ood acc | test_ood pass@k |", "|---|---|---|---|---|"]
    for role in ("base", "warm_start", "final", "champion"):
        block = accuracy.get(role)
        if not block:
            continue
        cells = [_fmt((block.get(s) or {}).get(f)) for s in ("test_id", "test_ood") for f in ("accuracy", "pass_at_k")]
        lines.append(f"| {role.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The run summary as Markdown (the exit handler's UI artifact and `run-local`'s closing print)."""
    stages = summary.get("stages") or {}
    lines = [f"# AMFT run {summary.get('run_id')}: {summary.get('state')}", ""]
    if summary.get("error"):
        lines += [f"Error: {summary['error']}", ""]
    lines += [f"Run root: `{summary.get('run_root', '?')}`", ""]
    if "data" in stages:
        rows = ", ".join(f"{k} {v}" for k, v in (stages["data"].get("rows") or {}).items())
        lines.append(f"- data: {rows}")
    if "validation" in stages:
        v = stages["validation"]
        failed = f" (failed: {', '.join(v.get('failed_checks') or [])})" if not v.get("passed") else ""
        lines.append(f"- validation gate: {'passed' if v.get('passed') else 'FAILED'}{failed}; report `{v['report']}`")
    if "warm_start" in stages:
        w = stages["warm_start"]
        val = w.get("val_accuracy") or {}
        kept = w.get("kept_model")
        kept = (f"; val accuracy {_fmt(val.get('after_warmup'))} after the warm-up, {_fmt(val.get('final_sft'))} after "
                f"the final SFT: kept the {str(kept).replace('_', '-')} model") if kept else ""
        lines.append(f"- warm start: acceptance {_fmt(w.get('acceptance_rate'))}, pass@k {_fmt(w.get('pass_at_k'))}, "
                     f"H* {_fmt(w.get('target_entropy'))}{kept}")
    if "train" in stages:
        t = stages["train"]
        resumed = f", resumed from step {t['resumed_from_step']}" if t.get("resumed_from_step") else ""
        lines.append(f"- training: {t.get('steps')} steps, μ final {_fmt(t.get('mu_final'))}, val accuracy "
                     f"{_fmt(t.get('val_accuracy_initial'))} → {_fmt(t.get('val_accuracy_final'))}{resumed}")
    if "eval" in stages:
        e = stages["eval"]
        verdict = "BLESSED" if e.get("blessed") else "not blessed"
        lines.append(f"- evaluation: {verdict} — {verdict_reason(e.get('reason'))}")
    training = [c for c in summary.get("changes") or [] if (c["from"], c["to"]) == ("warm_start", "candidate")]
    if training:
        lines.append("- what training changed (final − warm start, paired): " + "; ".join(
            f"{c['split']} {c['verdict']} ({c['diff']:+.3f}, 95 % CI [{c['lo']:+.3f}, {c['hi']:+.3f}])"
            for c in training))
    if "register" in stages:
        r = stages["register"]
        what = f"{r.get('name')} version {r.get('version')}" if r.get("registered") else "nothing registered"
        lines.append(f"- registry: {what}")
    if "lineage" in stages:
        cmd = stages["lineage"].get("command")
        lines.append(f"- lineage: `{stages['lineage']['uri']}`" + (f"; `{cmd}`" if cmd else ""))
    if summary.get("accuracy"):
        lines += ["", *accuracy_table(summary["accuracy"])]
    if summary.get("changes"):
        lines += ["", *changes_table(summary["changes"])]
    if summary.get("problems"):
        lines += ["", "Problems reading the run root:", *[f"- {p}" for p in summary["problems"]]]
    return "\n".join(lines) + "\n"
