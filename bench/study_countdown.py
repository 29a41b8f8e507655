"""The study: does a meta-learned μ beat a tuned fixed μ and a bug-free SFT→RL at equal compute? (Countdown)

    amft bench methods --task countdown                 # = python bench/bench_methods.py --task countdown
    amft bench methods --task countdown --commit        # also `git commit` each finished run's record

One command, resumable. It prepares the data, builds (or reads back) the shared warm start, tunes the two
tuned baselines on val, then trains every (method, seed) for `--steps` RL steps from that warm start and
scores each on every test_id and test_ood instance. What a finished piece leaves under
bench/results/study_countdown/ is what the next invocation resumes from:

- warm_start/: the shared starting model and its stats.json (committed: a fresh checkout resumes the same
  study instead of silently rebuilding a different warm start);
- study.json: the question's fingerprint (steps, seeds, data card, warm-start digest, evaluation sizes);
  a later invocation whose fingerprint differs is refused, naming the field, instead of mixing two studies;
- tuning/<job>.json: one val-only tuning run each (the switch step of sft_grpo, μ of fixed);
- records/<method>-s<seed>.json.gz: one finished run: its resolved config, rollout and wall-time budget, the
  μ / meta-t / val-accuracy curves and the per-instance results (greedy on every test instance, the number
  correct of k samples on the first `--pass-k-rows`).
Then bench/results/methods_countdown.{json,md} and methods_countdown_curves.png are rebuilt from whatever
runs exist, with the study's progress stated, so partial results are never mistaken for the answer.

Equal compute: every method samples the same B×G rollouts per step and draws the same SFT batch per step
(the trainer's settings are shared; only the controller differs). The meta methods also sample validation
rollouts for their meta-gradient: they are counted per run (`rollouts_meta`) and one extra row,
`fixed_budget`, gives the tuned fixed μ as many extra *training* rollouts per step as amft spends on its
meta steps, so "more samples" cannot be mistaken for "a better μ".
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STUDY = RESULTS / "study_countdown"
# Every row of the study. sft_grpo's switch step and fixed's μ are tuned on val; sft_grpo_rl50 is the
# SFT→RL variant with exactly 50 RL steps at the end (arXiv 2604.23747); fixed_budget is the tuned fixed μ
# with amft's meta rollouts given to it as training rollouts.
METHODS = ("sft", "grpo", "sft_grpo", "sft_grpo_rl50", "fixed", "fixed_budget", "chord", "hpt", "gac", "entropy",
           "meta", "amft")
# Follow-up rows, run only when named with --methods and reported beside the question's rows (never counted
# in its progress or verdict). The answer found μ decided by the entropy term (h_tol 0.05 drove amft to mu_max)
# and a meta term above noise on 9 % of meta steps; these give the meta term its best chance: its evidence
# pooled over 4 meta steps (the SNR records: pooled |t| ≥ 2 on 57 %), with and without the entropy drive
# (entropy_tolerance 0 is the raw Eq. 6 term, ≤ 0.0025 a step here). Each is amft plus these overrides.
FOLLOW_UPS = {"amft_pooled": ("controller.meta_accumulate=4",),
              "amft_pooled_raw_entropy": ("controller.meta_accumulate=4", "controller.entropy_tolerance=0")}
TEST_SPLITS = ("test_id", "test_ood")
TUNED = {"sft_grpo": "controller.switch_step", "fixed": "controller.mu_init"}
EVIDENCE = ("meta", "amft")  # run with the evidence-scaled controller (controller.meta_update=evidence)


@dataclass(frozen=True)
class Spec:
    """The study's question: what a resumed invocation must agree on (`fingerprint`)."""

    steps: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    config: str = "configs/tiny_countdown.yaml"
    warm_config: str = "configs/tiny_countdown_warm_start.yaml"
    overrides: tuple[str, ...] = ()
    eval_rows: int = 0  # greedy on the first this many instances of each test split; 0: all
    pass_k: int = 8
    pass_k_rows: int = 500
    eval_every: int = 20  # learning curves: greedy val accuracy every this many steps
    eval_prompts: int = 200
    tune_rows: int = 0  # tuning: greedy on the first this many val instances; 0: all
    tune_seed: int = 0
    switch_grid: tuple[int, ...] = (50, 100, 150)  # sft_grpo: RL starts at this step (tuned on val)
    mu_grid: tuple[float, ...] = (0.25, 0.5, 0.75)  # fixed: μ (tuned on val)
    checkpoint_every: int = 50  # an interrupted run resumes from its newest checkpoint
    given: tuple[tuple[str, float], ...] = ()  # (method, value) used instead of tuning (--tuned), recorded as such
    methods: tuple[str, ...] = field(default=METHODS, compare=False)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("methods")  # adding a method extends the study; it does not change its question
        d["seeds"] = list(self.seeds)  # a resumed study may add seeds; checked separately
        d.pop("seeds")
        return d


# ── what each job trains ─────────────────────────────────────────────────────────────────────────


# The study's numerics are pinned: `engine.precision=auto` resolves by the CPU's features and `compile=auto`
# by the step count, so a session landing on another CPU would silently train later runs in another
# precision than earlier ones. fp32 eager is what every CPU runs the same way; the KV cache is token-identical.
ENGINE = ("engine.precision=fp32", "engine.compile=never")


def base_overrides(spec: Spec) -> list[str]:
    """Shared by every method: the budget (steps), the learning-curve evaluation and the pinned engine."""
    return [f"max_steps={spec.steps}", f"eval_every={spec.eval_every}", f"eval_prompts={spec.eval_prompts}",
            "eval_samples=1", f"checkpoint_every={spec.checkpoint_every}",
            f"controller.chord_decay_steps={spec.steps}", *ENGINE, *spec.overrides]


def meta_rollouts_per_step(cfg) -> float:
    """Validation rollouts amft samples per training step on average: one meta step every meta_interval."""
    c = cfg.controller
    return c.meta_val_prompts * c.meta_val_group / c.meta_interval


def method_overrides(method: str, spec: Spec, tuned: dict[str, float], amft_cfg=None) -> list[str]:
    """The overrides that make `method` one row of the study (after `base_overrides`)."""
    if method == "sft_grpo":
        return ["controller.method=sft_grpo", f"controller.switch_step={int(tuned['sft_grpo'])}"]
    if method == "sft_grpo_rl50":
        return ["controller.method=sft_grpo", f"controller.switch_step={spec.steps - 50}"]
    if method == "fixed":
        return ["controller.method=fixed", f"controller.mu_init={tuned['fixed']}"]
    if method == "fixed_budget":
        g = amft_cfg.rollout.group_size
        extra_prompts = round(meta_rollouts_per_step(amft_cfg) / g)
        return ["controller.method=fixed", f"controller.mu_init={tuned['fixed']}",
                f"rollout.prompts_per_step={amft_cfg.rollout.prompts_per_step + extra_prompts}"]
    if method in EVIDENCE:
        return [f"controller.method={method}", "controller.meta_update=evidence"]
    if method in FOLLOW_UPS:
        return [*method_overrides("amft", spec, tuned), *FOLLOW_UPS[method]]
    return [f"controller.method={method}"]


def tuning_jobs(spec: Spec) -> list[dict]:
    """The val-only sweeps: sft_grpo over the switch step, fixed over μ (one seed, `spec.tune_seed`)."""
    jobs = [{"name": f"sft_grpo-switch{s}", "method": "sft_grpo", "value": s,
             "overrides": ["controller.method=sft_grpo", f"controller.switch_step={s}"]} for s in spec.switch_grid]
    jobs += [{"name": f"fixed-mu{m:g}", "method": "fixed", "value": m,
              "overrides": ["controller.method=fixed", f"controller.mu_init={m}"]} for m in spec.mu_grid]
    return jobs


def pick_tuned(records: Sequence[dict]) -> dict[str, float]:
    """Per tuned method, the grid value with the best val accuracy (ties: the first in grid order)."""
    best: dict[str, tuple[float, float]] = {}
    for r in records:
        acc = r["val_accuracy"]
        if r["method"] not in best or acc > best[r["method"]][0]:
            best[r["method"]] = (acc, r["value"])
    return {m: v for m, (_, v) in best.items()}


# ── the record files (temp name, then rename: a killed study never leaves half a record) ──────────


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":
        with gzip.open(tmp, "wt") as f:
            json.dump(data, f)
    else:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def run_path(study: Path, method: str, seed: int) -> Path:
    # records/, not runs/: the checkout ignores runs/ (training output folders), and these must be committed
    return study / "records" / f"{method}-s{seed}.json.gz"


def check_fingerprint(study: Path, spec: Spec, facts: dict) -> None:
    """Refuse to extend a study that asked another question (SystemExit naming the first differing field)."""
    want = json.loads(json.dumps({**spec.fingerprint(), **facts}))  # tuples compare as the lists JSON keeps
    have = read_json(study / "study.json")
    if have is None:
        return
    old_cfg, new_cfg = have["fingerprint"].get("train_config", {}), want.pop("train_config", {})
    for key in sorted(set(old_cfg) & set(new_cfg)):  # a setting added since keeps its old meaning at its default
        if old_cfg[key] != new_cfg[key]:
            raise SystemExit(f"error: {study / 'study.json'}: setting {key!r} was {old_cfg[key]!r} when the study "
                             f"started and resolves to {new_cfg[key]!r} now: runs trained under both would not "
                             "answer one question; pin it with --set or start a new study with --study DIR")
    for key in sorted((set(want) | set(have["fingerprint"])) - {"train_config"}):
        if have["fingerprint"].get(key) != want.get(key):
            raise SystemExit(f"error: {study / 'study.json'}: field {key!r} is {have['fingerprint'].get(key)!r}, "
                             f"this invocation asks {want.get(key)!r}: a study's budget and inputs are its question; "
                             "resume with the recorded settings or start a new study with --study DIR")


def check_committable(study: Path) -> None:
    """--commit: refuse at the start, not after the first hour's run, when git would ignore the records."""
    probe = run_path(study, "probe", 0)
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", str(probe)]).returncode == 0
    if ignored or not study.is_relative_to(ROOT):
        raise SystemExit(f"error: --commit: {probe.parent} is outside the checkout or ignored by git; "
                         "records there cannot be committed")


def commit(paths: Sequence[Path], message: str) -> None:
    """`git commit` exactly these paths (other staged or modified files are left alone)."""
    rel = [str(p.relative_to(ROOT)) for p in paths]
    subprocess.run(["git", "-C", str(ROOT), "add", "--", *rel], check=True)
    subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m", message, "--", *rel], check=True)


# ── workers (one process each, one thread) ───────────────────────────────────────────────────────


def _single_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _train_config(job: dict):
    from amft_lib.config import apply_overrides, load_config

    return apply_overrides(load_config(job["config"]), [
        *job["base"], *job["overrides"], f"seed={job['seed']}", f"data.path={job['data']}",
        f"controller.target_entropy={job['target_entropy']}",
        f"controller.target_entropy_temperature={job['temperature']}"])


def _train(job: dict, cfg):
    """run_train from the warm start; an interrupted run resumes from its newest checkpoint. Returns the
    result and the run's training wall time, earlier processes' share included (a run resumed in a later
    session must not report only the minutes of its last piece)."""
    from amft_lib.checkpoint import list_checkpoints
    from amft_lib.trainer import run_train

    run_dir = Path(job["run_dir"])
    steps = [step for step, _, complete in list_checkpoints(str(run_dir)) if complete]  # what resume can use
    resume = "auto" if steps else "never"
    t0 = time.perf_counter()
    res = run_train(cfg, run_dir / "out", init_model=job["warm_model"], progress=False,
                    checkpoint_root=str(run_dir), resume=resume)
    earlier = earlier_train_s(_jsonl(run_dir / "out" / "metrics.jsonl"), max(steps, default=0))
    return res, earlier + time.perf_counter() - t0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def earlier_train_s(metrics: Sequence[dict], resumed_at: int) -> float:
    """Wall seconds that earlier processes spent on the steps a resumed run kept (step < `resumed_at`).
    `elapsed_s` restarts in every process, so each earlier process's share is the `elapsed_s` of its last
    kept step; the steps it ran after its last checkpoint were thrown away and are not counted."""
    total, last = 0.0, None
    for row in metrics:
        if row.get("final") or row["step"] >= resumed_at or row.get("elapsed_s") is None:
            continue
        if last is not None and row["elapsed_s"] < last:  # a new process began
            total += last
        last = row["elapsed_s"]
    return total + (last or 0.0)


def curves(out: Path, val_initial: float) -> dict:
    """μ and reward per step, greedy val accuracy at step 0, every eval_every steps and at the end (the
    `eval_prompts` first val rows), and each meta step's evidence."""
    every = _jsonl(out / "metrics.jsonl")
    rows = [x for x in every if not x.get("final")]
    val = [[0, val_initial]] + [[x["step"] + 1, x["val_accuracy"]] for x in rows if x.get("val_accuracy") is not None]
    val += [[x["step"], x["val_accuracy"]] for x in every if x.get("final")]
    meta = _jsonl(out / "controller.jsonl")
    keep = ("step", "meta_grad", "meta_grad_se", "meta_grad_t", "delta_mu", "reason", "half_cosine")
    return {"step": [x["step"] for x in rows], "mu": [x["mu"] for x in rows],
            "reward_mean": [x["reward_mean"] for x in rows], "entropy": [x["entropy"] for x in rows],
            "val": val,
            "meta": [{k: m.get(k) for k in keep} for m in meta]}


def score(model_dir: str, cfg, job: dict, splits: Sequence[str], rows_cap: int, pass_k_rows: int) -> dict:
    """Per instance of each split: greedy 0/1 on the first `rows_cap` rows (0: all), by the library's
    greedy scorer (the one `amft evaluate` uses, so the two cannot disagree), and the number correct of k
    samples (rollout temperature, a fixed seed per split: every method sees the same stream) on the first
    `pass_k_rows` (0: none). Prompts are rendered as the model was trained (`model.chat_template`)."""
    import torch

    from amft_lib.dataset import read_rows
    from amft_lib.model import load_policy
    from amft_lib.rollout import sample_completions
    from amft_lib.scoring import greedy_eval, score_completions
    from amft_lib.tasks import get_task

    data = read_rows(job["data"])
    model, tok = load_policy(cfg.model.__class__(**{**cfg.model.__dict__, "name": str(model_dir)}))
    model.eval()
    task = get_task(cfg.data.task)
    k, chat, out = job["pass_k"], cfg.model.chat_template, {}
    for i, split in enumerate(splits):
        rows = data[split][: rows_cap or None]
        with torch.no_grad():
            greedy = greedy_eval(model, tok, task, rows, cfg.rollout.max_new_tokens, chat, n_samples=len(rows),
                                 batch_size=256)
            counts: list[int] = []
            if pass_k_rows:
                torch.manual_seed(10_007 + i)
                sub = rows[:pass_k_rows]
                sampled = sample_completions(model, tok, [r["prompt"] for r in sub], group_size=k,
                                             max_new_tokens=cfg.rollout.max_new_tokens,
                                             temperature=cfg.rollout.temperature, chat_template=chat,
                                             batch_size=256)
                rewards, _ = score_completions(task, [r["answer"] for r in sub for _ in range(k)], sampled.texts)
                counts = rewards.view(-1, k).sum(dim=1).int().tolist()
        out[split] = {"ids": [r["id"] for r in rows], "greedy": [int(x["reward"]) for x in greedy.samples],
                      f"correct_of_{k}": counts}
    return out


def summary_of(instances: dict, k: int) -> dict[str, float]:
    out = {}
    for split, s in instances.items():
        out[split] = sum(s["greedy"]) / max(1, len(s["greedy"]))
        counts = s[f"correct_of_{k}"]
        if counts:
            out[f"{split}_pass@{k}"] = sum(c > 0 for c in counts) / len(counts)
    return out


def run_job(job: dict) -> dict:
    """One unit of the study in a worker: the warm start's scores, a tuning run, or a (method, seed) run.
    Writes its record file (temp name, then rename) and returns it."""
    from amft_lib.config import apply_overrides, config_to_dict, load_config

    _single_thread()
    t0 = time.perf_counter()
    if job["kind"] == "warm_start":
        cfg = apply_overrides(load_config(job["config"]), [f"data.path={job['data']}"])
        inst = score(job["warm_model"], cfg, job, TEST_SPLITS, job["eval_rows"], job["pass_k_rows"])
        record = {"method": "warm_start", "seed": None, "instances": inst, "accuracy": summary_of(inst, job["pass_k"]),
                  "eval_s": time.perf_counter() - t0}
        write_json(Path(job["record"]), record)
        return record
    cfg = _train_config(job)
    res, train_s = _train(job, cfg)
    model_dir, run_curves = res.model_dir, curves(Path(job["run_dir"]) / "out", res.val_accuracy_initial)
    t1 = time.perf_counter()
    out = Path(job["run_dir"]) / "out"
    record = {"method": job["method"], "seed": job["seed"], "steps": cfg.max_steps, "overrides": job["overrides"],
              "config": config_to_dict(cfg), "train_s": train_s}
    if job["kind"] == "tune":
        inst = score(str(model_dir), cfg, job, ("val",), job["tune_rows"], 0)
        record.update(name=job["name"], value=job["value"], val_accuracy=summary_of(inst, job["pass_k"])["val"],
                      n_val=len(inst["val"]["greedy"]), val_curve=run_curves["val"])
    else:
        inst = score(str(model_dir), cfg, job, TEST_SPLITS, job["eval_rows"], job["pass_k_rows"])
        # meta steps = controller.jsonl lines with a meta-gradient (gac logs its noise estimate every step and
        # samples no validation rollouts)
        c = cfg.controller
        n_meta = sum(x.get("meta_grad") is not None for x in _jsonl(out / "controller.jsonl"))
        record.update(instances=inst, accuracy=summary_of(inst, job["pass_k"]), curves=run_curves,
                      rollouts_train=cfg.max_steps * cfg.rollout.prompts_per_step * cfg.rollout.group_size,
                      rollouts_meta=n_meta * c.meta_val_prompts * c.meta_val_group, n_meta_steps=n_meta,
                      sft_rows_per_step=cfg.loss.sft_batch_size, mu_final=res.mu_final)
    record["eval_s"] = time.perf_counter() - t1
    write_json(Path(job["record"]), record)
    return record



# ── the study: prepare → warm start → tuning → runs (two at a time) → report ─────────────────────


def prepare(spec: Spec, study: Path, out: Path, do_commit: bool) -> dict:
    """Data (regenerated deterministically; its card's sha256 is part of the fingerprint), the shared warm
    start (built once, then kept under `study` so a fresh checkout resumes from the same model) and H*."""
    from bench_methods import h_star_at

    from amft_lib.config import WarmStartConfig, apply_overrides, load_config
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.dataset import card_digest
    from amft_lib.model_files import content_digest
    from amft_lib.warm_start import run_warm_start

    data = out / "data"
    if not (data / "card.json").exists():
        run_prepare(PrepareConfig(task="countdown", out_dir=str(data)))
    temperature = apply_overrides(load_config(spec.config), list(spec.overrides)).rollout.temperature
    warm, built = study / "warm_start", out / "warm_start"
    if not (warm / "stats.json").exists():
        if not (built / "stats.json").exists():
            wcfg = apply_overrides(load_config(spec.warm_config, WarmStartConfig),
                                   [f"data.path={data}", f"entropy_temperature={temperature}"])
            # a SmolLM2 warm start is ~30 min: an interrupted one continues from its checkpoints
            run_warm_start(wcfg, built, checkpoint_root=str(out / "warm_start_checkpoints"), resume="auto")
        tmp = study / "warm_start.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        big = _bytes(built / "model") > COMMIT_MODEL_MAX
        if not big:  # committed, so a fresh checkout resumes from the same model
            shutil.copytree(built / "model", tmp / "model")
        elif (built / "adapter").is_dir() and _bytes(built / "adapter") <= COMMIT_MODEL_MAX:
            shutil.copytree(built / "adapter", tmp / "adapter")  # a LoRA warm start: merged back on resume
        shutil.copy2(built / "stats.json", tmp / "stats.json")
        os.replace(tmp, warm)
        if do_commit:
            commit([warm], f"study (countdown): the shared warm start, {spec.warm_config}")
    model = warm / "model"
    if not model.exists():  # too big for git: it stays in the working folder, or is rebuilt from its adapter
        model = built / "model"
        if not (model / "config.json").exists() and (warm / "adapter").is_dir():
            from amft_lib.model import merge_adapter

            wcfg = load_config(spec.warm_config, WarmStartConfig)
            print(f"study: rebuilding the warm start from its committed adapter ({warm / 'adapter'})", flush=True)
            merge_adapter(wcfg.model, warm / "adapter", model, seed=wcfg.seed)  # its digest is checked below
        if not (model / "config.json").exists():
            raise SystemExit(f"error: the study's warm-start model is not committed (over "
                             f"{COMMIT_MODEL_MAX >> 20} MiB) and {model} is missing: resume where it was built, "
                             "or start a new --study folder")
    wstats = json.loads((warm / "stats.json").read_text())
    h_star = h_star_at(warm, model, wstats, temperature, spec.warm_config, data)
    facts = {"data_card_sha256": card_digest(data), "warm_start_digest": content_digest(model),
             "train_config": flat_config(spec)}
    return {"data": str(data), "warm_model": str(model), "warm_stats": wstats, "target_entropy": h_star,
            "temperature": temperature, "facts": facts}


# A warm-start model bigger than this is not committed (SmolLM2-135M merged is ~540 MB): the study keeps
# only its stats, and its digest is in study.json, so a rebuilt one cannot be mistaken for it.
COMMIT_MODEL_MAX = 32 << 20


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def flat_config(spec: Spec) -> dict:
    """The base training config every row shares, flattened (`rollout.group_size`: 8): resolved from the
    config file, the study's overrides and today's defaults, so a changed default is caught on resume."""
    from amft_lib.config import apply_overrides, config_to_dict, load_config

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    cfg = apply_overrides(load_config(spec.config), base_overrides(spec))
    skip = ("seed", "data.path", "controller.method")  # set per run
    return {k: v for k, v in flat(config_to_dict(cfg)).items() if k not in skip}


def _common(spec: Spec, prep: dict) -> dict:
    return {"config": spec.config, "data": prep["data"], "warm_model": prep["warm_model"], "base": base_overrides(spec),
            "target_entropy": prep["target_entropy"], "temperature": prep["temperature"], "pass_k": spec.pass_k,
            "pass_k_rows": spec.pass_k_rows, "eval_rows": spec.eval_rows, "tune_rows": spec.tune_rows}


def amft_config(spec: Spec, common: dict):
    """amft's resolved config: what fixed_budget's extra training rollouts are matched to."""
    return _train_config({**common, "overrides": method_overrides("amft", spec, {}), "seed": 0})


def plan(spec: Spec, study: Path, out: Path, common: dict) -> list[dict]:
    """Every job not yet recorded, in the order they should run: the warm start's scores, the tuning runs,
    then the runs seed by seed (all methods of seed 0 first, so an unfinished study still compares every
    method on a seed). Runs of tuned methods carry needs_tuning and wait for the sweeps."""
    jobs = [{**common, "kind": "warm_start", "record": str(study / "warm_start_scores.json")}]
    if not spec.given:
        jobs += [{**common, **t, "kind": "tune", "seed": spec.tune_seed, "run_dir": str(out / "tune" / t["name"]),
                  "record": str(study / "tuning" / f"{t['name']}.json")} for t in tuning_jobs(spec)]
    jobs += [{**common, "kind": "run", "method": m, "seed": s, "needs_tuning": m in ("sft_grpo", "fixed",
                                                                                     "fixed_budget"),
              "run_dir": str(out / "runs" / f"{m}-s{s}"), "record": str(run_path(study, m, s))}
             for s in spec.seeds for m in spec.methods]
    return [j for j in jobs if not Path(j["record"]).exists()]


def _finish(job: dict, spec: Spec, study: Path, common: dict, tuned: dict) -> None:
    """Fill in a run's overrides once it can be (tuned methods need the sweeps' result)."""
    if job["kind"] == "run":
        amft = amft_config(spec, common) if job["method"] == "fixed_budget" else None
        job["overrides"] = method_overrides(job["method"], spec, tuned, amft)


def load_tuned(spec: Spec, study: Path) -> dict[str, float] | None:
    if spec.given:
        return dict(spec.given)
    records = [read_json(study / "tuning" / f"{t['name']}.json") for t in tuning_jobs(spec)]
    return pick_tuned(records) if all(r is not None for r in records) else None


def execute(jobs: list[dict], spec: Spec, study: Path, common: dict, workers: int, do_commit: bool,
            on_done) -> None:
    """Run the jobs, `workers` at a time (one thread each); after each: commit its record, print progress
    with rate and ETA, call on_done() (the report)."""
    pending, running = list(jobs), {}
    done, t0 = 0, time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            tuned = load_tuned(spec, study)
            while len(running) < workers:
                ready = next((j for j in pending if not j.get("needs_tuning") or tuned is not None), None)
                if ready is None:
                    break
                pending.remove(ready)
                _finish(ready, spec, study, common, tuned or {})
                running[pool.submit(run_job, ready)] = ready
            if not running:
                raise SystemExit("error: tuned runs are waiting on tuning records that no job will write")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                record = _result(fut, job)
                done += 1
                elapsed = time.perf_counter() - t0
                left = len(pending) + len(running)
                eta = elapsed / done * left  # jobs finish `workers` at a time: the rate already says so
                print(f"[{done}/{done + left}] {_label(job)}: {_brief(record)} ({elapsed / 60:.1f} min, "
                      f"{elapsed / done / 60:.1f} min per job, ETA {eta / 60:.0f} min)", flush=True)
                if do_commit:
                    commit([Path(job["record"])], f"study (countdown): {_label(job)} finished — {_brief(record)}")
                on_done()


def _result(fut: Future, job: dict) -> dict:
    try:
        return fut.result()
    except Exception as e:  # one failed run must not lose the others' records: report it and stop cleanly
        raise SystemExit(f"error: {_label(job)} failed: {type(e).__name__}: {e}") from e


def _label(job: dict) -> str:
    if job["kind"] == "warm_start":
        return "warm start scores"
    if job["kind"] == "tune":
        return f"tuning {job['name']}"
    return f"{job['method']} seed {job['seed']}"


def _brief(record: dict) -> str:
    if "val_accuracy" in record:
        return f"val {record['val_accuracy']:.3f}"
    acc = record["accuracy"]
    return ", ".join(f"{k} {acc[k]:.3f}" for k in TEST_SPLITS if k in acc)


# The second model family (issue: "as many steps as fit ~1 hour of both cores", 500 test_id instances).
# Measured on this machine (one thread, the tiny study running beside it): ~48 s per SmolLM2 + LoRA step and
# ~130 s per meta step (every 5th), so 60 steps is ~50 min for amft on one core; three runs on two cores plus
# the warm start and the scoring is ~1.5 h. Learning curves on 100 val prompts and a checkpoint every 10 steps
# (a run is ~1 h: an interrupted one must not lose it). Greedy on 500 of each test split, pass@8 on 100.
SMOLLM2 = {"config": "configs/smollm2_countdown_lora.yaml", "warm_config": "configs/smollm2_countdown_warm_start.yaml",
           "study": "study_countdown_smollm2", "methods": ["amft", "sft_grpo", "fixed"], "seeds": [0],
           "steps": 60, "eval_rows": 500, "pass_k_rows": 100, "eval_prompts": 100, "checkpoint_every": 10}


def apply_model_preset(args) -> None:
    """--model smollm2: the second model family's study (its own configs, folder and report), unless the
    user named those explicitly; --model tiny: the tiny configs."""
    if args.model == "smollm2":
        args.config = args.config or SMOLLM2["config"]
        args.warm_config = args.warm_config or SMOLLM2["warm_config"]
        args.study = args.study or str(RESULTS / SMOLLM2["study"])
        args.methods = args.methods or SMOLLM2["methods"]
        args.question = SMOLLM2["methods"]
        args.seeds = args.seeds or SMOLLM2["seeds"]
        args.out = args.out or "bench/out/study_countdown_smollm2"
        args.steps = args.steps or SMOLLM2["steps"]
        args.eval_rows = SMOLLM2["eval_rows"] if args.eval_rows is None else args.eval_rows
        args.pass_k_rows = SMOLLM2["pass_k_rows"] if args.pass_k_rows is None else args.pass_k_rows
        args.spec_extra = {k: SMOLLM2[k] for k in ("eval_prompts", "checkpoint_every")}
    args.eval_rows = Spec.eval_rows if args.eval_rows is None else args.eval_rows
    args.pass_k_rows = Spec.pass_k_rows if args.pass_k_rows is None else args.pass_k_rows
    args.config = args.config or Spec.config
    args.warm_config = args.warm_config or Spec.warm_config


def _given(items: Sequence[str] | None) -> tuple[tuple[str, float], ...]:
    out = []
    for item in items or ():
        method, _, value = item.partition("=")
        if method not in TUNED or not value:
            raise SystemExit(f"error: --tuned {item!r}: expected sft_grpo=STEP or fixed=MU")
        out.append((method, float(value)))
    if out and {m for m, _ in out} != set(TUNED):
        raise SystemExit(f"error: --tuned: give a value for each of {', '.join(TUNED)} (or none, to tune on val)")
    return tuple(sorted(out))


OPERATIONAL = {"--workers": 1, "--commit": 0, "--report-only": 0, "--no-report-every-run": 0, "--n-boot": 1}


def canonical_command(argv: Sequence[str]) -> str:
    """The command that asks the study's question: argv without the flags that only say how to run it
    (workers, committing, reporting), so a resumed or report-only invocation names the same command."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg.split("=")[0] in OPERATIONAL:
            skip = 0 if "=" in arg else OPERATIONAL[arg]
        else:
            out.append(arg)
    return " ".join(["amft bench methods", *out])


def without_methods(argv: Sequence[str]) -> list[str]:
    """argv without `--methods A B …`: which rows an invocation runs is not the study's question."""
    out, dropping = [], False
    for arg in argv:
        if arg == "--methods" or arg.startswith("--methods="):
            dropping = arg == "--methods"
            continue
        if dropping and not arg.startswith("-"):
            continue
        dropping = False
        out.append(arg)
    return out


def spec_from_args(args) -> Spec:
    return Spec(given=_given(args.tuned), steps=args.steps, seeds=tuple(args.seeds), config=args.config,
                warm_config=args.warm_config, overrides=tuple(args.set), eval_rows=args.eval_rows,
                pass_k=args.pass_k, pass_k_rows=args.pass_k_rows,
                switch_grid=tuple(args.switch_grid), mu_grid=tuple(args.mu_grid), methods=tuple(args.methods),
                **getattr(args, "spec_extra", {}))


def main(args) -> None:
    """`bench_methods.py --task countdown`: run (or resume) the study, then rebuild its report."""
    import study_report

    spec = spec_from_args(args)
    known = (*METHODS, *FOLLOW_UPS)
    unknown = [m for m in spec.methods if m not in known]
    if unknown:
        raise SystemExit(f"error: --methods: {', '.join(unknown)} not in the study; choose from {', '.join(known)}")
    question = list(getattr(args, "question", METHODS))  # the rows the verdict and its progress count
    if spec.steps < 50:
        raise SystemExit(f"error: --steps={spec.steps}: the study's SFT→RL variant needs at least 50 RL steps")
    bad = [] if spec.given else [s for s in spec.switch_grid if not 0 < s < spec.steps]  # no sweep when given
    bad += [v for m, v in spec.given if m == "sft_grpo" and not 0 < v < spec.steps]
    if bad and spec.given:
        raise SystemExit(f"error: --tuned sft_grpo={bad[-1]:g}: outside 1..{spec.steps - 1} "
                         "(RL must start within the run)")
    if bad:
        raise SystemExit(f"error: --switch-grid: {bad} outside 1..{spec.steps - 1} (RL must start within the run)")
    study = Path(args.study).resolve() if args.study else STUDY
    report_dir = RESULTS if study == STUDY else study  # only the default study is the README's
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    command = canonical_command(without_methods(sys.argv[1:]))  # the question's, whichever rows run now
    if args.commit:
        check_committable(study)
    prep = prepare(spec, study, out, args.commit)
    check_fingerprint(study, spec, prep["facts"])
    if not (study / "study.json").exists():
        write_json(study / "study.json", {"command": command, "fingerprint": {**spec.fingerprint(), **prep["facts"]},
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        if args.commit:
            commit([study / "study.json"], "study (countdown): the question's fingerprint")
    common = _common(spec, prep)

    def meta() -> dict:
        tuned = load_tuned(spec, study)
        tuning = [read_json(study / "tuning" / f"{t['name']}.json") for t in tuning_jobs(spec)]
        # the question's rows, then any row asked for now or already recorded (a follow-up run last session)
        extra = [m for m in (*METHODS, *FOLLOW_UPS) if m not in question and (
            m in spec.methods or any(run_path(study, m, s).exists() for s in spec.seeds))]
        follow = {"rows": extra, "command": f"{command} --methods {' '.join(extra)}"} if extra else None
        return {"command": command, "spec": asdict(spec), "methods": question + extra, "question": question,
                "follow_up": follow, "seeds": list(spec.seeds),
                "tuned": tuned, "tuning": [{k: r[k] for k in ("name", "value", "val_accuracy", "n_val", "overrides")}
                                           for r in tuning if r is not None],
                "warm_start": prep["warm_stats"], "target_entropy": prep["target_entropy"], **prep["facts"]}

    def on_done() -> None:
        if args.report_every_run:
            study_report.report(study, meta(), args.n_boot, report_dir)

    if not args.report_only:
        jobs = plan(spec, study, out, common)
        print(f"study: {len(jobs)} job(s) to run under {study} ({args.workers} at a time)", flush=True)
        execute(jobs, spec, study, common, args.workers, args.commit, on_done)
    print(study_report.report(study, meta(), args.n_boot, report_dir))
    if args.commit:
        stems = ("methods_countdown.json", "methods_countdown.md", "methods_countdown_curves.png")
        paths = [report_dir / s for s in stems if (report_dir / s).exists()]
        if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *map(str, paths)],
                          capture_output=True, text=True).stdout.strip():
            commit(paths, "study (countdown): report rebuilt from the finished runs")
