"""Speed of the AMFT trainer against TRL's GRPOTrainer, plus rollout, meta-gradient and FLOP/s figures.

    python bench/bench_speed.py                      # tiny model, 3 interleaved repeats (~6 min on 2 CPU cores)
    python bench/bench_speed.py --model tiny --repeats 5

What is measured (same policy, prompts, B prompts × G completions, max_new_tokens, verifier):
1. one GRPO step of ours (`amft_lib.trainer.run_train`, method grpo, time_rollout_s + time_update_s from
   metrics.jsonl) vs one step of TRL's GRPOTrainer (callback time from on_step_begin to on_step_end:
   generation, reward, forward/backward, clip, AdamW step). beta=0 on both sides, no reference model,
   fp32, no gradient checkpointing, token-mean loss (TRL `dapo`), group-std scaled advantages.
2. rollout tokens/s of `amft_lib.rollout.sample_completions` vs a bare `model.generate` on the same
   pre-encoded prompts and the same sampling settings and seed (so both produce the same tokens).
3. meta-gradient overhead at T_meta=10: method amft (time_meta_s amortised over its steps) vs grpo.
4. achieved FLOP/s of the RL forward/backward (6·N·tokens / time) vs a measured fp32 matmul peak.

Every measurement runs in its own subprocess with OMP_NUM_THREADS=1 and torch.set_num_threads(1); the
compared runs are interleaved (ours, TRL, amft, ours, TRL, amft, …) so machine-load changes hit both,
the first step of every run is dropped (allocation warm-up) and medians are reported.
TRL is a bench-only extra: `.venv/bin/pip install -r requirements/bench.txt -c requirements/lock.txt`
(or point --trl-python at another interpreter that has trl; amft_lib is put on its PYTHONPATH).
Writes bench/results/speed.json and bench/results/speed.md and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORKERS = ("ours", "trl", "amft", "rollout", "flops")


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


# ── workers: each runs in a fresh process and writes one JSON file ─────────────────────────────────


def _rows(work: Path) -> dict[str, list[dict]]:
    return json.loads((work / "rows.json").read_text())


def _train_cfg(a, method: str, steps: int, policy: str):
    from amft_lib.config import TrainConfig, apply_overrides

    return apply_overrides(
        TrainConfig(),
        [
            f"controller.method={method}",
            f"max_steps={steps}",
            "eval_every=0",
            "eval_prompts=0",
            "device=cpu",
            "precision=fp32",
            f"model.name={policy}",
            f"rollout.prompts_per_step={a.prompts}",
            f"rollout.group_size={a.group}",
            f"rollout.max_new_tokens={a.max_new_tokens}",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "loss.loss_agg=token_mean",
            "loss.scale_rewards=true",
            "loss.kl_beta=0.0",
            "loss.ppo_epochs=1",
            f"loss.micro_batch_size={a.prompts * a.group}",
            f"controller.meta_interval={a.meta_interval}",
            "optim.lr=1e-3",
            "optim.weight_decay=0.0",
            "optim.grad_clip=1.0",
            f"seed={a.seed}",
        ],
    )


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time of a one-thread process barely moves when other jobs share the cores,
    so it is reported beside wall time as the load-robust figure."""
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - t[0], now[1] - t[1]


def _timed(fn, wall: list[float], cpu: list[float], when=lambda: True):
    """`fn` with its wall and CPU time appended on every call where `when()` (instrumentation only)."""

    def wrapper(*args, **kwargs):
        record, t0 = when(), _clock()
        try:
            return fn(*args, **kwargs)
        finally:
            if record:
                dw, dc = _since(t0)
                wall.append(dw)
                cpu.append(dc)

    return wrapper


def _run_ours(a, work: Path, method: str, steps: int, splits: dict) -> dict:
    """Our real training loop, instrumented from outside: per-step wall times come from metrics.jsonl
    (time_rollout_s + time_update_s + time_meta_s); per-step CPU time runs from the step's rollout call
    (`sample_and_score`, the loop's first call after taking prompts) to its `controller_step` call (the
    loop's first call after the optimizer and scheduler step), the same span the wall times cover."""
    from amft_lib import controller as ctl
    from amft_lib import trainer as trainer_mod

    st = {"armed": True, "in_rollout": False, "start": 0.0}
    step_cpu, gen_wall, gen_cpu, meta_wall, meta_cpu = [], [], [], [], []
    orig_sample_and_score, orig_controller_step = trainer_mod.sample_and_score, ctl.controller_step

    def sample_and_score(*args, **kwargs):
        if not st["armed"]:  # a validation rollout inside the meta-gradient
            return orig_sample_and_score(*args, **kwargs)
        st.update(armed=False, in_rollout=True, start=time.process_time())
        try:
            return orig_sample_and_score(*args, **kwargs)
        finally:
            st["in_rollout"] = False

    def controller_step(*args, **kwargs):
        step_cpu.append(time.process_time() - st["start"])
        st["armed"] = True
        return orig_controller_step(*args, **kwargs)

    trainer_mod.sample_and_score = sample_and_score
    ctl.controller_step = controller_step
    trainer_mod.sample_completions = _timed(
        trainer_mod.sample_completions, gen_wall, gen_cpu, when=lambda: st["in_rollout"]
    )
    ctl.compute_meta_gradient = _timed(ctl.compute_meta_gradient, meta_wall, meta_cpu)

    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{method}-"))
    policy = str(work / "policy")
    trainer_mod.run_train(_train_cfg(a, method, steps, policy), out, init_model=policy, splits=splits, progress=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if not r.get("final")]
    meta_steps = [r["step"] for r in records if r["meta_grad"] is not None]
    keep = [i for i, s in enumerate(meta_steps) if s >= a.warmup]
    w = a.warmup
    return {
        "step_s": [r["time_rollout_s"] + r["time_update_s"] + r["time_meta_s"] for r in records][w:],
        "step_cpu_s": step_cpu[w:],
        "rollout_s": [r["time_rollout_s"] for r in records][w:],
        "update_s": [r["time_update_s"] for r in records][w:],
        "meta_s": [r["time_meta_s"] for r in records][w:],
        "generate_s": gen_wall[w:],
        "generate_cpu_s": gen_cpu[w:],
        "meta_steps": [meta_steps[i] for i in keep],
        "meta_call_s": [meta_wall[i] for i in keep],
        "meta_call_cpu_s": [meta_cpu[i] for i in keep],
        "completion_len": [r["completion_len"] for r in records][w:],
    }


def worker_ours(a, work: Path) -> dict:
    """Method grpo (μ = 0: RL gradient only, no SFT batch, no meta-gradient)."""
    rows = _rows(work)
    # grpo never uses demonstrations; dropping them spares the loop tokenising an unused SFT batch, as TRL does
    train_rows = [{k: v for k, v in r.items() if k != "demonstration"} for r in rows["train"]]
    return _run_ours(a, work, "grpo", a.steps, {"train": train_rows, "val": []})


def worker_amft(a, work: Path) -> dict:
    """Method amft (RL and SFT gradients every step, meta-gradient every T_meta steps)."""
    rows = _rows(work)
    return _run_ours(a, work, "amft", a.meta_steps, {"train": rows["train"], "val": rows["val"]})


def worker_trl(a, work: Path) -> dict:
    """TRL's GRPOTrainer on the same saved policy, tokenizer, prompts and verifier."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from amft_lib.tasks import get_task

    policy = str(work / "policy")
    tok = PreTrainedTokenizerFast.from_pretrained(policy)
    tok.padding_side = "left"
    task = get_task("general_points")
    train_rows = _rows(work)["train"]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in train_rows])

    def general_points_reward(prompts, completions, answer, **_):
        return [task.verify(ans, text).reward for ans, text in zip(answer, completions, strict=True)]

    class StepTimer(TrainerCallback):
        """on_step_begin → on_step_end: generation, reward, forward/backward, clip, AdamW and scheduler step."""

        def __init__(self):
            self.t0, self.wall, self.cpu, self.logs = (0.0, 0.0), [], [], {}

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = _clock()

        def on_step_end(self, args, state, control, **kw):
            dw, dc = _since(self.t0)
            self.wall.append(dw)
            self.cpu.append(dc)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.logs[state.global_step] = logs

    n = a.prompts * a.group
    args = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=work, prefix="trl-"))),
        per_device_train_batch_size=n,  # TRL counts completions: B prompts × G generations in one micro-batch
        gradient_accumulation_steps=1,  # so steps_per_generation = 1: one generation, one optimizer step
        num_generations=a.group,
        max_completion_length=a.max_new_tokens,
        max_steps=a.steps,
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,  # GRPOConfig defaults bf16/checkpointing on
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        seed=a.seed,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=general_points_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[timer],
    )
    gen_wall, gen_cpu = [], []  # the generation call of each step (prompt ids in, completion ids out)
    trainer._generate_single_turn = _timed(trainer._generate_single_turn, gen_wall, gen_cpu)
    trainer.train()
    lens = [timer.logs[s]["completions/mean_length"] for s in sorted(timer.logs)]
    w = a.warmup
    return {
        "step_s": timer.wall[w:],
        "step_cpu_s": timer.cpu[w:],
        "generate_s": gen_wall[w:],
        "generate_cpu_s": gen_cpu[w:],
        "completion_len": lens[w:],
        "trl_version": trl.__version__,
        "threads": torch.get_num_threads(),
        "policy_dtype": str(next(trainer.model.parameters()).dtype),
    }


def worker_rollout(a, work: Path) -> dict:
    """sample_completions vs a bare model.generate: same pre-encoded prompts, sampling settings and seed."""
    import torch
    from transformers import GenerationConfig

    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy
    from amft_lib.rollout import encode_prompts, sample_completions

    model, tok = load_policy(ModelConfig(name=str(work / "policy")))
    prompts = [r["prompt"] for r in _rows(work)["train"][: a.prompts]]
    expanded = [p for p in prompts for _ in range(a.group)]
    ids, mask = encode_prompts(tok, expanded)
    gen_cfg = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=a.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model.eval()

    def ours(seed: int) -> int:
        torch.manual_seed(seed)
        return sample_completions(
            model, tok, prompts, group_size=a.group, max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=1.0
        ).n_tokens

    def plain(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1] :]
        # tokens up to and including the first EOS, as sample_completions counts them
        is_eos = out == tok.eos_token_id
        first = torch.where(
            is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], out.shape[1], dtype=torch.long)
        )
        return int(first.sum())

    res = {f"{n}_{k}": [] for n in ("ours", "plain") for k in ("s", "cpu_s", "tokens")}
    for i in range(a.rollout_repeats + 1):
        for name, fn in (("ours", ours), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("ours", ours)):
            t0 = _clock()
            n_tok = fn(1000 + i)
            dw, dc = _since(t0)
            if i > 0:  # the first round warms both up
                res[f"{name}_s"].append(dw)
                res[f"{name}_cpu_s"].append(dc)
                res[f"{name}_tokens"].append(n_tok)
    return res


def worker_flops(a, work: Path) -> dict:
    """Achieved FLOP/s of the RL forward/backward (rl_gradient, the function the loop calls) vs fp32 matmul peak."""
    import torch

    from amft_lib.config import ModelConfig
    from amft_lib.losses import group_advantages
    from amft_lib.model import load_policy, trainable_parameters
    from amft_lib.rollout import completion_logprobs, sample_completions
    from amft_lib.trainer import rl_gradient

    cfg = _train_cfg(a, "grpo", 1, str(work / "policy"))
    model, tok = load_policy(ModelConfig(name=str(work / "policy")))
    model.train()
    params = trainable_parameters(model)
    n_params = sum(p.numel() for p in params)
    n_embed = model.get_input_embeddings().weight.numel()
    torch.manual_seed(a.seed)
    prompts = [r["prompt"] for r in _rows(work)["train"][: a.prompts]]
    batch = sample_completions(model, tok, prompts, group_size=a.group, max_new_tokens=a.max_new_tokens)
    rewards = (torch.arange(len(batch)) % 3 == 0).float()  # any non-constant rewards: the cost does not depend on them
    adv = group_advantages(rewards, a.group)
    with torch.no_grad():
        old, _ = completion_logprobs(model, batch)
    seq_len = batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    tokens = len(batch) * seq_len  # every position goes through the model (prompt and padding included)
    wall, cpu = [], []
    for i in range(a.flops_repeats + 1):
        t0 = _clock()
        rl_gradient(model, params, batch, old, adv, cfg)
        if i > 0:  # the first call warms up
            dw, dc = _since(t0)
            wall.append(dw)
            cpu.append(dc)

    size = 2048
    x, y = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(x, y)
    mm_wall, mm_cpu = [], []
    for _ in range(5):
        t0 = _clock()
        torch.matmul(x, y)
        dw, dc = _since(t0)
        mm_wall.append(dw)
        mm_cpu.append(dc)
    work_flop = 6 * n_params * tokens
    mm_flop = 2 * size**3
    return {
        "n_params": n_params,
        "n_embedding_params": n_embed,
        "sequences": len(batch),
        "seq_len": seq_len,
        "tokens": tokens,
        "fwd_bwd_s": wall,
        "fwd_bwd_cpu_s": cpu,
        "matmul_size": size,
        "matmul_s": mm_wall,
        "matmul_cpu_s": mm_cpu,
        "achieved_flops": work_flop / statistics.median(wall),
        "peak_flops": mm_flop / statistics.median(mm_wall),
        "achieved_flops_cpu": work_flop / statistics.median(cpu),
        "peak_flops_cpu": mm_flop / statistics.median(mm_cpu),
    }


# ── the driver ────────────────────────────────────────────────────────────────────────────────────


def _prepare(a, work: Path) -> None:
    """The shared inputs: the policy as an HF directory (what TRL's from_pretrained loads) and the prompts."""
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy
    from amft_lib.tasks.general_points import generate_rows

    model, tok = load_policy(ModelConfig(name=a.model), seed=a.seed)
    save_policy(model, tok, work / "policy")
    rows = {"train": generate_rows(256, "face10", 1, "train"), "val": generate_rows(64, "face10", 2, "val")}
    (work / "rows.json").write_text(json.dumps(rows))


def _run_worker(a, name: str, work: Path, python: str, repeat: int) -> dict:
    out = work / f"{name}-{repeat}.json"
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--work",
        str(work),
        "--worker-out",
        str(out),
        *_passthrough(a),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {name} failed (exit {proc.returncode})")
    print(f"  {name:8s} repeat {repeat}: {time.perf_counter() - t0:5.1f} s wall", flush=True)
    return json.loads(out.read_text())


def _passthrough(a) -> list[str]:
    keys = (
        "prompts",
        "group",
        "max_new_tokens",
        "steps",
        "meta_steps",
        "meta_interval",
        "warmup",
        "seed",
        "rollout_repeats",
        "flops_repeats",
        "model",
    )
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]


def _device_label() -> str:
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} (CPU, {os.cpu_count()} cores visible, 1 torch thread per process)"


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _pool(runs: list[dict], key: str) -> list[float]:
    return [x for r in runs for x in r[key]]


def summarise(a, runs: dict[str, list[dict]], rollout: dict, flops: dict, command: str, wall: float) -> dict:
    import torch
    import transformers

    ours, trl, amft = runs["ours"], runs["trl"], runs["amft"]
    n = a.prompts * a.group

    def side(rs: list[dict]) -> dict:
        step, cpu, gen, gen_cpu = (_pool(rs, k) for k in ("step_s", "step_cpu_s", "generate_s", "generate_cpu_s"))
        return {
            "step_median_s": _med(step),
            "step_cpu_median_s": _med(cpu),
            "generate_median_s": _med(gen),
            "generate_cpu_median_s": _med(gen_cpu),
            "rest_median_s": _med([s - g for s, g in zip(step, gen, strict=True)]),
            "rest_cpu_median_s": _med([s - g for s, g in zip(cpu, gen_cpu, strict=True)]),
            "mean_completion_tokens": statistics.mean(_pool(rs, "completion_len")),
            "completion_tokens_per_s": _med(
                [n * x / s for x, s in zip(_pool(rs, "completion_len"), step, strict=True)]
            ),
            "steps_measured": len(step),
            "step_s": step,
            "step_cpu_s": cpu,
        }

    o, t = side(ours), side(trl)
    o["rollout_phase_median_s"] = _med(_pool(ours, "rollout_s"))  # generation + reward + π_old/entropy forward
    o["update_phase_median_s"] = _med(_pool(ours, "update_s"))  # forward/backward + clip + AdamW
    rollout_ours = [k / s for k, s in zip(rollout["ours_tokens"], rollout["ours_s"], strict=True)]
    rollout_plain = [k / s for k, s in zip(rollout["plain_tokens"], rollout["plain_s"], strict=True)]
    rollout_ours_cpu = [k / s for k, s in zip(rollout["ours_tokens"], rollout["ours_cpu_s"], strict=True)]
    rollout_plain_cpu = [k / s for k, s in zip(rollout["plain_tokens"], rollout["plain_cpu_s"], strict=True)]
    amft_step, amft_cpu = _pool(amft, "step_s"), _pool(amft, "step_cpu_s")
    meta_call, meta_call_cpu = _pool(amft, "meta_call_s"), _pool(amft, "meta_call_cpu_s")
    grpo_step, grpo_cpu = o["step_s"], o["step_cpu_s"]
    return {
        "command": command,
        "device": _device_label(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl[0]["trl_version"],
            "python": platform.python_version(),
        },
        "setup": {
            "model": a.model,
            "n_params": flops["n_params"],
            "prompts_B": a.prompts,
            "group_G": a.group,
            "max_new_tokens": a.max_new_tokens,
            "steps_per_run": a.steps,
            "warmup_steps_dropped": a.warmup,
            "repeats": a.repeats,
            "amft_steps_per_run": a.meta_steps,
            "meta_interval": a.meta_interval,
            "seed": a.seed,
            "trl_policy_dtype": trl[0]["policy_dtype"],
            "trl_threads": trl[0]["threads"],
        },
        "rl_step": {
            "ours": o,
            "trl": t,
            "ratio_ours_over_trl": o["step_median_s"] / t["step_median_s"],
            "ratio_ours_over_trl_cpu": o["step_cpu_median_s"] / t["step_cpu_median_s"],
            "per_repeat_ratios": [_med(x["step_s"]) / _med(y["step_s"]) for x, y in zip(ours, trl, strict=True)],
            "per_repeat_ratios_cpu": [
                _med(x["step_cpu_s"]) / _med(y["step_cpu_s"]) for x, y in zip(ours, trl, strict=True)
            ],
        },
        "rollout": {
            "ours_tokens_per_s": _med(rollout_ours),
            "generate_tokens_per_s": _med(rollout_plain),
            "ratio_ours_over_generate": _med(rollout_ours) / _med(rollout_plain),
            "ours_tokens_per_cpu_s": _med(rollout_ours_cpu),
            "generate_tokens_per_cpu_s": _med(rollout_plain_cpu),
            "ratio_ours_over_generate_cpu": _med(rollout_ours_cpu) / _med(rollout_plain_cpu),
            "same_tokens": rollout["ours_tokens"] == rollout["plain_tokens"],
            **rollout,
        },
        "meta": {
            # means, not medians: one step in T_meta carries the meta-gradient, a median would hide it
            "amft_mean_step_s": statistics.mean(amft_step),
            "amft_mean_step_cpu_s": statistics.mean(amft_cpu),
            "grpo_mean_step_s": statistics.mean(grpo_step),
            "grpo_mean_step_cpu_s": statistics.mean(grpo_cpu),
            "amft_over_grpo": statistics.mean(amft_step) / statistics.mean(grpo_step),
            "amft_over_grpo_cpu": statistics.mean(amft_cpu) / statistics.mean(grpo_cpu),
            "meta_s_per_meta_step_median": _med(meta_call),
            "meta_cpu_s_per_meta_step_median": _med(meta_call_cpu),
            "meta_s_amortised_per_step": sum(meta_call) / len(amft_step),
            "meta_cpu_s_amortised_per_step": sum(meta_call_cpu) / len(amft_cpu),
            "meta_overhead_pct_of_amft_step": 100 * sum(meta_call) / sum(amft_step),
            "meta_overhead_pct_of_amft_step_cpu": 100 * sum(meta_call_cpu) / sum(amft_cpu),
            "meta_steps_measured": len(meta_call),
            "amft_steps_measured": len(amft_step),
            "amft_step_s": amft_step,
            "amft_step_cpu_s": amft_cpu,
            "meta_call_s": meta_call,
        },
        "flops": {
            **flops,
            "mfu": flops["achieved_flops"] / flops["peak_flops"],
            "mfu_cpu": flops["achieved_flops_cpu"] / flops["peak_flops_cpu"],
        },
        "wall_s": wall,
    }


def markdown(r: dict) -> str:
    s, rl, ro, me, fl = r["setup"], r["rl_step"], r["rollout"], r["meta"], r["flops"]
    o, t = rl["ours"], rl["trl"]
    n = s["prompts_B"] * s["group_G"]

    def row(label: str, ours: float, ref: float, fmt: str = ".3f", bold: bool = False, extra: str = "") -> str:
        ratio = f"{ours / ref:.2f}"
        return f"| {label} | {ours:{fmt}} | {ref:{fmt}} | {f'**{ratio}**' if bold else ratio}{extra} |"

    per_rep = ", ".join(f"{x:.2f}" for x in rl["per_repeat_ratios"])
    lines = [
        "# Speed benchmark (bench/bench_speed.py)",
        "",
        f"Command: `{r['command']}`  ",
        f"Device: {r['device']}  ",
        f"Versions: torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
        f"trl {r['versions']['trl']}, Python {r['versions']['python']}  ",
        f"Setup: model `{s['model']}` ({s['n_params']:,} params), B={s['prompts_B']} prompts × G={s['group_G']}, "
        f"max_new_tokens={s['max_new_tokens']}, fp32, beta=0, one optimizer step per rollout batch; "
        f"{s['repeats']} interleaved repeats × {s['steps_per_run']} steps per side (first {s['warmup_steps_dropped']} "
        f"of each run dropped); medians unless marked mean. Wall time is the primary figure; CPU time (process time "
        f"of the one-thread worker) is the load-robust one.",
        "",
        "| measurement | ours | reference | ours / reference |",
        "|---|---|---|---|",
        row(
            "GRPO step, wall s (ref: TRL GRPOTrainer)",
            o["step_median_s"],
            t["step_median_s"],
            bold=True,
            extra=f" (per repeat: {per_rep})",
        ),
        row("GRPO step, CPU s", o["step_cpu_median_s"], t["step_cpu_median_s"], bold=True),
        row("… generation, wall s", o["generate_median_s"], t["generate_median_s"]),
        row("… generation, CPU s", o["generate_cpu_median_s"], t["generate_cpu_median_s"]),
        row("… rest: reward, log-prob forwards, backward, AdamW, wall s", o["rest_median_s"], t["rest_median_s"]),
        row("… rest, CPU s", o["rest_cpu_median_s"], t["rest_cpu_median_s"]),
        row(
            "completion tokens per GRPO step (mean)",
            n * o["mean_completion_tokens"],
            n * t["mean_completion_tokens"],
            ".0f",
        ),
        row(
            "completion tokens / s over a whole GRPO step",
            o["completion_tokens_per_s"],
            t["completion_tokens_per_s"],
            ".0f",
        ),
        row(
            f"rollout tokens / wall s (ref: bare `model.generate`, identical tokens: {ro['same_tokens']})",
            ro["ours_tokens_per_s"],
            ro["generate_tokens_per_s"],
            ".0f",
        ),
        row("rollout tokens / CPU s", ro["ours_tokens_per_cpu_s"], ro["generate_tokens_per_cpu_s"], ".0f"),
        row(
            f"step, mean wall s (ours: amft, T_meta={s['meta_interval']}; ref: grpo)",
            me["amft_mean_step_s"],
            me["grpo_mean_step_s"],
        ),
        row("step, mean CPU s (amft vs grpo)", me["amft_mean_step_cpu_s"], me["grpo_mean_step_cpu_s"]),
        f"| meta-gradient: wall s per meta step / amortised s per step / share of amft step | "
        f"{me['meta_s_per_meta_step_median']:.3f} / {me['meta_s_amortised_per_step']:.3f} / "
        f"{me['meta_overhead_pct_of_amft_step']:.1f} % (CPU: {me['meta_overhead_pct_of_amft_step_cpu']:.1f} %) | | |",
        f"| RL forward+backward FLOP/s = 6·N·tokens / t, CPU time (ref: fp32 {fl['matmul_size']}² matmul) | "
        f"{fl['achieved_flops_cpu'] / 1e9:.1f} G | {fl['peak_flops_cpu'] / 1e9:.1f} G | {100 * fl['mfu_cpu']:.0f} % |",
        f"| same, wall time | {fl['achieved_flops'] / 1e9:.1f} G | {fl['peak_flops'] / 1e9:.1f} G | "
        f"{100 * fl['mfu']:.0f} % |",
        "",
        f"FLOP count: N = {fl['n_params']:,} parameters (embedding {fl['n_embedding_params']:,}, tied), tokens = "
        f"{fl['sequences']} sequences × {fl['seq_len']} positions (prompt + padded completion); attention FLOPs not "
        f"counted. Whole run: {r['wall_s']:.0f} s.",
        "",
        f"Our step splits into a rollout phase of {o['rollout_phase_median_s']:.3f} s (generation and reward) and an "
        f"update phase of {o['update_phase_median_s']:.3f} s (forward/backward, clip, AdamW). With one update per "
        "batch both loops skip a separate π_old forward (the ratio is exactly 1, so the detached training log-probs "
        "serve) and take the entropy from the training forward.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a local HF directory")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (ours, TRL, amft) rounds")
    ap.add_argument("--prompts", type=int, default=8, help="B: prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps per run (ours and TRL), warm-up included")
    ap.add_argument("--meta-steps", type=int, default=11, help="amft steps per run (step 0 dropped: 1 meta step in 10)")
    ap.add_argument("--meta-interval", type=int, default=10, help="T_meta")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of every run")
    ap.add_argument("--rollout-repeats", type=int, default=8)
    ap.add_argument("--flops-repeats", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed (default: this one)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        _single_thread()
        import logging

        logging.disable(logging.WARNING)
        result = globals()[f"worker_{a.worker}"](a, Path(a.work))
        Path(a.worker_out).write_text(json.dumps(result))
        return

    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        work = Path(tmp)
        _single_thread()
        _prepare(a, work)
        runs: dict[str, list[dict]] = {"ours": [], "trl": [], "amft": []}
        for rep in range(a.repeats):
            order = ("ours", "trl", "amft") if rep % 2 == 0 else ("trl", "ours", "amft")
            for name in order:
                python = a.trl_python if name == "trl" else sys.executable
                runs[name].append(_run_worker(a, name, work, python, rep))
        rollout = _run_worker(a, "rollout", work, sys.executable, 0)
        flops = _run_worker(a, "flops", work, sys.executable, 0)
    result = summarise(a, runs, rollout, flops, command, time.perf_counter() - t_start)
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
