"""Compile the pipeline and check run parameters against it: the only module that imports the DAG.

`amft pipeline compile|params`, the local runner and submit/schedule all go through here, so a
parameter is typed and checked the same way whether it ends up in a kfp.local run, a KFP API
request or the UI's run form.
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_YAML = REPO_ROOT / "pipelines" / "amft_pipeline.yaml"


def load_pipeline(local: bool = False) -> Any:
    """The cluster variant, or with `local` the one kfp.local can run (no platform config)."""
    from pipelines import amft_pipeline as module

    return module.amft_pipeline_local if local else module.amft_pipeline


def pipeline_inputs(pipeline: Any) -> dict[str, tuple[str, Any]]:
    """{name: (KFP type name, default)} of a compiled-in pipeline's parameters."""
    return {name: (spec.type, spec.default) for name, spec in pipeline.component_spec.inputs.items()}


def parse_params(pipeline: Any, settings: Sequence[str], params_file: Path | None = None,
                 base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge `base`, a params file and PARAM=VALUE strings into pipeline arguments, typed and checked
    against the pipeline's parameters (unknown names and wrong types are errors naming the fix)."""
    from amft_lib.config import ConfigError
    from amft_lib.config_file import load_mapping_file, parse_value

    inputs = pipeline_inputs(pipeline)
    raw: dict[str, Any] = dict(base or {})
    if params_file is not None:
        raw.update(load_mapping_file(params_file, "params file"))
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected PARAM=VALUE")
        key = key.strip()
        if inputs.get(key, ("String",))[0] == "String":
            raw[key] = value
            continue
        raw[key] = parse_value(value, f"--set {key}")
    out = {}
    for key, value in raw.items():
        if key not in inputs:
            raise ConfigError(f"unknown pipeline parameter {key!r}; `amft pipeline params` lists them")
        out[key] = _coerce_param(key, inputs[key][0], value)
    return out


def _coerce_param(key: str, kind: str, value: Any) -> Any:
    from amft_lib.config import ConfigError

    checks = {"String": (str,), "Integer": (int,), "Float": (int, float), "Boolean": (bool,), "Dict": (dict,),
              "List": (list,)}
    wanted = checks.get(kind, (object,))
    if isinstance(value, bool) and kind in ("Integer", "Float"):
        wanted = ()
    if kind == "String" and value is not None and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, wanted):
        raise ConfigError(f"pipeline parameter {key}={value!r}: expected {kind}")
    return float(value) if kind == "Float" else value


def compile_pipeline(out: Path | str, kueue_queue: str = "", kueue_priority_class: str = "") -> Path:
    """Compile the cluster variant to IR YAML at `out`, byte-for-byte reproducibly; with a Kueue queue
    (and priority class) its GPU task pods carry Kueue's labels (see amft_pipeline.build_pipeline)."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kueue_queue or kueue_priority_class:
        from pipelines.amft_pipeline import build_pipeline

        pipeline = build_pipeline("cluster", kueue_queue, kueue_priority_class)
    else:
        pipeline = load_pipeline()
    compiler.Compiler().compile(pipeline, str(out))
    out.write_text(stable_header(out.read_text(encoding="utf-8")), encoding="utf-8")
    return out


_DEFAULT_COMMENT = re.compile(r"^(#.*\[Default: )(.*)(\])$")


def stable_header(text: str) -> str:
    """kfp writes a comment header listing each parameter's default; dict defaults come out of a
    protobuf map whose order changes from process to process, so the committed YAML would change
    on every compile. Re-render those defaults with sorted keys (comments only; the spec is sorted)."""

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [ordered(v) for v in value]
        return value

    lines = []
    for line in text.splitlines(keepends=True):
        m = _DEFAULT_COMMENT.match(line.rstrip("\n"))
        if m:
            with contextlib.suppress(ValueError, SyntaxError):
                line = f"{m.group(1)}{ordered(ast.literal_eval(m.group(2)))!r}{m.group(3)}\n"
        lines.append(line)
    return "".join(lines)
