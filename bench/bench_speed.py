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
import itertools
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
WORKERS = ("ours", "ours_new", "trl", "amft", "rollout", "flops", "sft_today", "sft_new", "sft_trl")


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


# ── workers: each runs in a fresh process and writes one JSON file ─────────────────────────────────


def _rows(work: Path) -> dict[str, list[dict]]:
    return json.loads((work / "rows.json").read_text())


# The two engines raced (issue 25): today's (eager fp32, transformers' DynamicCache) and the new one (compiled
# forward/backward, bf16 autocast with fp32 attention, preallocated KV cache). One thread each: the bench
# compares engines, not thread counts (engine.threads would pick 2 on an idle box).
ENGINES = {
    "today": ["engine.precision=fp32", "engine.compile=never", "engine.kv_cache=dynamic", "engine.threads=1"],
    "new": ["engine.precision=auto", "engine.compile=always", "engine.kv_cache=preallocated", "engine.threads=1"],
}


def _engine_cfg(name: str):
    from amft_lib.config import engine_overrides

    return engine_overrides([x.removeprefix("engine.") for x in ENGINES[name]])


def _train_cfg(a, method: str, steps: int, policy: str, engine: str = "today"):
    from amft_lib.config import TrainConfig, apply_overrides

    return apply_overrides(
        TrainConfig(),
        [
            *ENGINES[engine],
            f"controller.method={method}",
            f"max_steps={steps}",
            "eval_every=0",
            "eval_prompts=0",
            "device=cpu",
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


def _compile_clock() -> list:
    """Every BucketedForward the run builds (to read its compile time afterwards)."""
    from amft_lib import engine

    built: list = []
    init = engine.BucketedForward.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    engine.BucketedForward.__init__ = spy
    return built


def _run_ours(a, work: Path, method: str, steps: int, splits: dict, engine: str = "today") -> dict:
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

    built = _compile_clock()
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{method}-"))
    policy = str(work / "policy")
    t_run = time.perf_counter()
    trainer_mod.run_train(_train_cfg(a, method, steps, policy, engine), out, init_model=policy, splits=splits,
                          progress=False)
    run_s = time.perf_counter() - t_run
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
        "rl_loss": [r["rl_loss"] for r in records],  # every step, warm-up included: the loss-curve check
        "entropy": [r["entropy"] for r in records],
        "reward_mean": [r["reward_mean"] for r in records],
        "compile_s": sum(b.compile_s for b in built),
        "run_s": run_s,
    }


def worker_ours(a, work: Path) -> dict:
    """Method grpo (μ = 0: RL gradient only, no SFT batch, no meta-gradient)."""
    rows = _rows(work)
    # grpo never uses demonstrations; dropping them spares the loop tokenising an unused SFT batch, as TRL does
    train_rows = [{k: v for k, v in r.items() if k != "demonstration"} for r in rows["train"]]
    return _run_ours(a, work, "grpo", a.steps, {"train": train_rows, "val": []})


def worker_ours_new(a, work: Path) -> dict:
    """Method grpo on the new engine (ENGINES["new"]): the same work as worker_ours."""
    rows = _rows(work)
    train_rows = [{k: v for k, v in r.items() if k != "demonstration"} for r in rows["train"]]
    return _run_ours(a, work, "grpo", a.steps, {"train": train_rows, "val": []}, engine="new")


def _sft_timed(a, work: Path, engine_name: str) -> dict:
    """The warm start's own SFT loop (warm_start.sft_steps: cursor over the demonstrations, AdamW, clipping,
    LR schedule) for --sft-steps steps of --sft-batch demonstrations, on one engine. A step's time runs from
    one sft_gradient call to the next (gradient, clip, optimizer step)."""
    import torch

    from amft_lib import warm_start
    from amft_lib.config import WarmStartConfig, apply_overrides
    from amft_lib.distributed import SINGLE
    from amft_lib.engine import plan
    from amft_lib.model import load_policy
    from amft_lib.policy import Policy

    cfg = apply_overrides(WarmStartConfig(), [f"model.name={work / 'policy'}", f"batch_size={a.sft_batch}",
                                              f"micro_batch_size={a.sft_batch}", f"max_new_tokens={a.max_new_tokens}",
                                              *ENGINES[engine_name]])
    built = _compile_clock()
    model, tok = load_policy(cfg.model, seed=a.seed)
    model.train()
    policy = Policy.of(model, tok, SINGLE, torch.device("cpu"), plan(cfg.engine, "cpu", steps=a.sft_steps))
    starts: list[float] = []
    cpu: list[float] = []
    orig = warm_start.sft_gradient

    def sft_gradient(*args, **kwargs):
        starts.append(time.perf_counter())
        cpu.append(time.process_time())
        return orig(*args, **kwargs)

    warm_start.sft_gradient = sft_gradient
    history = warm_start.sft_steps(policy, tok, _rows(work)["train"], a.sft_steps, cfg, a.seed, "warmup")
    starts.append(time.perf_counter())
    cpu.append(time.process_time())
    w = a.warmup
    return {
        "step_s": [b - x for x, b in itertools.pairwise(starts)][w:],
        "step_cpu_s": [b - x for x, b in itertools.pairwise(cpu)][w:],
        "first_step_s": starts[1] - starts[0],
        "loss": [h["sft_loss"] for h in history],
        "compile_s": sum(b.compile_s for b in built),
        "precision": policy.engine.precision,
        "compiled": policy.engine.compile,
    }


def worker_sft_today(a, work: Path) -> dict:
    return _sft_timed(a, work, "today")


def worker_sft_new(a, work: Path) -> dict:
    return _sft_timed(a, work, "new")


def worker_sft_trl(a, work: Path) -> dict:
    """TRL's SFTTrainer on the same policy and demonstrations: prompt-completion rows, loss on completion
    tokens only (our SFT loss), --sft-batch rows per step, AdamW as the warm start configures it, fp32."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    policy = str(work / "policy")
    tok = PreTrainedTokenizerFast.from_pretrained(policy)
    rows = _rows(work)["train"]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["demonstration"]} for r in rows])

    args = SFTConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=work, prefix="trl-sft-"))), per_device_train_batch_size=a.sft_batch,
        gradient_accumulation_steps=1, max_steps=a.sft_steps, learning_rate=3e-3, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.01, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        packing=False, completion_only_loss=True, max_length=1024, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=a.seed,
    )
    timer = _trl_step_timer("loss")
    trainer = SFTTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer])
    trainer.train()
    w = a.warmup
    return {"step_s": timer.wall[w:], "step_cpu_s": timer.cpu[w:],
            "loss": [timer.logs[s]["loss"] for s in sorted(timer.logs)]}


def worker_amft(a, work: Path) -> dict:
    """Method amft (RL and SFT gradients every step, meta-gradient every T_meta steps)."""
    rows = _rows(work)
    return _run_ours(a, work, "amft", a.meta_steps, {"train": rows["train"], "val": rows["val"]})


def _trl_step_timer(log_key: str):
    """A TrainerCallback timing every step from on_step_begin to on_step_end (generation, reward,
    forward/backward, clip, AdamW and scheduler step) and keeping, by step, the logs that carry `log_key`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.wall, self.cpu, self.logs = (0.0, 0.0), [], [], {}

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = _clock()

        def on_step_end(self, args, state, control, **kw):
            dw, dc = _since(self.t0)
            self.wall.append(dw)
            self.cpu.append(dc)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and log_key in logs:
                self.logs[state.global_step] = logs

    return StepTimer()


def worker_trl(a, work: Path) -> dict:
    """TRL's GRPOTrainer on the same saved policy, tokenizer, prompts and verifier."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
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
    timer = _trl_step_timer("completions/mean_length")
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
    """Decoding, same prompts, settings and seed (so every variant draws the same tokens, checked):
    `new` sample_completions with the preallocated KV cache, `today` with transformers' DynamicCache, and
    `generate` a bare model.generate on pre-encoded prompts (the call TRL's GRPOTrainer makes). Then two
    identity checks of new vs today: greedy, and per-row seeded sampling (row_seeds, as rollouts draw)."""
    import torch
    from transformers import GenerationConfig

    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy
    from amft_lib.rollout import encode_prompts, row_seeds, sample_completions

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

    def ours(kv_cache: str):
        def run(seed: int) -> torch.Tensor:
            torch.manual_seed(seed)
            return sample_completions(model, tok, prompts, group_size=a.group, max_new_tokens=a.max_new_tokens,
                                      temperature=1.0, top_p=1.0, kv_cache=kv_cache).completion_ids
        return run

    def plain(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1] :]
        # tokens up to and including the first EOS, padding after it, as sample_completions returns them
        after = (out == tok.eos_token_id).int().cumsum(1) - (out == tok.eos_token_id).int() > 0
        return out.masked_fill(after, tok.pad_token_id)

    variants = {"new": ours("preallocated"), "today": ours("dynamic"), "generate": plain}
    res: dict = {f"{n}_{k}": [] for n in variants for k in ("s", "cpu_s", "tokens")}
    same = True
    for i in range(a.rollout_repeats + 1):
        names = list(variants) if i % 2 == 0 else list(reversed(variants))
        outs = {}
        for name in names:
            t0 = _clock()
            outs[name] = variants[name](1000 + i)
            dw, dc = _since(t0)
            if i > 0:  # the first round warms all up
                res[f"{name}_s"].append(dw)
                res[f"{name}_cpu_s"].append(dc)
                res[f"{name}_tokens"].append(int((outs[name] != tok.pad_token_id).sum()))
        width = min(o.shape[1] for o in outs.values())
        same &= all(torch.equal(o[:, :width], outs["today"][:, :width]) for o in outs.values())
    seeds = row_seeds(a.seed, "rollout", 0, 0, len(expanded))
    checks = {}
    for label, kw in (("greedy", {"greedy": True}), ("row_seeded", {"seeds": seeds})):
        got = [sample_completions(model, tok, prompts, group_size=a.group, max_new_tokens=a.max_new_tokens,
                                  kv_cache=kv, **kw).completion_ids for kv in ("preallocated", "dynamic")]
        checks[label] = torch.equal(*got)
    res["same_tokens_all_variants"] = bool(same)
    res["same_tokens_greedy"] = checks["greedy"]
    res["same_tokens_row_seeded"] = checks["row_seeded"]
    return res


def worker_flops(a, work: Path) -> dict:
    """Achieved FLOP/s of the RL forward/backward (rl_gradient, the function the loop calls) vs fp32 matmul peak."""
    import torch

    from amft_lib.config import ModelConfig
    from amft_lib.losses import group_advantages
    from amft_lib.model import load_policy, trainable_parameters
    from amft_lib.policy import Policy
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
        rl_gradient(Policy(model, model, tok), params, batch, old, adv, cfg)
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
        # one inductor cache per bench run: the first compiling run starts cold (a fresh pod), later ones
        # reuse its graphs (a pod with a persistent cache); compile_s of each run shows both
        TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"),
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
        "sft_steps",
        "sft_batch",
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


LOSS_TOLERANCE = 0.02  # |Δ SFT loss| per step, new engine vs today's, same init and batches (issue: 0.006 / 300 steps)


def _ratios(num: list[dict], den: list[dict], key: str) -> list[float]:
    """Per-repeat ratios of medians: each repeat's runs ran back to back, so load changes hit both."""
    return [_med(x[key]) / _med(y[key]) for x, y in zip(num, den, strict=True)]


def _three_way(today: list[dict], new: list[dict], trl: list[dict]) -> dict:
    """Medians of step time (wall, CPU) on each engine and the ratios between them."""
    out: dict = {}
    for key, label in (("step_s", ""), ("step_cpu_s", "_cpu")):
        t, n, r = (_med(_pool(x, key)) for x in (today, new, trl))
        out.update({f"today{label}_s": t, f"new{label}_s": n, f"trl{label}_s": r, f"new_over_today{label}": n / t,
                    f"new_over_trl{label}": n / r, f"today_over_trl{label}": t / r,
                    f"per_repeat_new_over_trl{label}": _ratios(new, trl, key),
                    f"per_repeat_new_over_today{label}": _ratios(new, today, key)})
    return out


def engine_summary(runs: dict[str, list[dict]], sft: dict[str, list[dict]], rollout: dict) -> dict:
    """Issue 25's table: the SFT step, the RL step and decoding on the new engine vs today's vs TRL's."""
    sft_step = _three_way(sft["sft_today"], sft["sft_new"], sft["sft_trl"])
    saved = sft_step["today_s"] - sft_step["new_s"]
    compile_s = [r["compile_s"] for r in sft["sft_new"]]
    diffs = [max(abs(x - y) for x, y in zip(t["loss"], n["loss"], strict=True))
             for t, n in zip(sft["sft_today"], sft["sft_new"], strict=True)]
    sft_step.update({
        "compile_s": compile_s,
        "saved_per_step_s": saved,
        "loss_curve_max_abs_diff": max(diffs), "loss_tolerance": LOSS_TOLERANCE,
        "loss_curve_within_tolerance": max(diffs) <= LOSS_TOLERANCE,
        "loss_today": sft["sft_today"][0]["loss"], "loss_new": sft["sft_new"][0]["loss"],
        "loss_trl": sft["sft_trl"][0]["loss"], "new_precision": sft["sft_new"][0]["precision"],
    })
    rl_step = _three_way(runs["ours"], runs["ours_new"], runs["trl"])
    rl_step.update({
        "compile_s": [r["compile_s"] for r in runs["ours_new"]],
        # step 0 samples the same rollouts on both engines (fp32 decoding, same weights): its entropy, taken
        # from the training forward, compares the numerics; later steps diverge as RL does
        "entropy_step0_abs_diff": max(abs(t["entropy"][0] - n["entropy"][0])
                                      for t, n in zip(runs["ours"], runs["ours_new"], strict=True)),
        "reward_mean_today": statistics.mean(_pool(runs["ours"], "reward_mean")),
        "reward_mean_new": statistics.mean(_pool(runs["ours_new"], "reward_mean")),
        "goal_new_over_trl_at_most": 0.5,
    })
    per_batch = {n: _med(rollout[f"{n}_s"]) for n in ("new", "today", "generate")}
    per_batch_cpu = {n: _med(rollout[f"{n}_cpu_s"]) for n in ("new", "today", "generate")}
    decode = {
        **{f"{n}_s": v for n, v in per_batch.items()}, **{f"{n}_cpu_s": v for n, v in per_batch_cpu.items()},
        "new_over_today": per_batch["new"] / per_batch["today"],
        "new_over_generate": per_batch["new"] / per_batch["generate"],
        "today_over_generate": per_batch["today"] / per_batch["generate"],
        "new_over_today_cpu": per_batch_cpu["new"] / per_batch_cpu["today"],
        "new_over_generate_cpu": per_batch_cpu["new"] / per_batch_cpu["generate"],
        "same_tokens_all_variants": rollout["same_tokens_all_variants"],
        "same_tokens_greedy": rollout["same_tokens_greedy"],
        "same_tokens_row_seeded": rollout["same_tokens_row_seeded"],
    }
    return break_even({"engines": ENGINES, "sft_step": sft_step, "rl_step": rl_step, "decode": decode})


def break_even(e: dict) -> dict:
    """SFT steps after which compiling has paid for itself: compile time / wall time saved per step, with a cold
    inductor cache (the bench's first compiling run: its RL run of repeat 0, a fresh pod) and a warm one (the
    median of the later runs, which reuse its graphs)."""
    sf, rl = e["sft_step"], e["rl_step"]
    runs = [*rl["compile_s"], *sf["compile_s"]]  # in the order they ran: RL repeats first
    saved = sf.setdefault("saved_per_step_s", sf["today_s"] - sf["new_s"])
    sf["compile_cold_s"], sf["compile_warm_s"] = runs[0], _med(runs[1:]) if len(runs) > 1 else runs[0]
    sf["break_even_steps_cold"] = sf["compile_cold_s"] / saved if saved > 0 else None
    sf["break_even_steps_warm"] = sf["compile_warm_s"] / saved if saved > 0 else None
    return e


def _join(xs: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in xs)


def engine_markdown(r: dict) -> list[str]:
    """The engine section of speed.md."""
    e, s = r["engine"], r["setup"]
    sf, rl, de = e["sft_step"], e["rl_step"], e["decode"]

    def line(label: str, d: dict, unit: str = "s", cpu: bool = False) -> str:
        k = "_cpu" if cpu else ""
        times = " | ".join(f"{d[f'{side}{k}_s']:.3f} {unit}" for side in ("new", "today", "trl"))
        return (f"| {label} | {times} | **{d[f'new_over_today{k}']:.2f}** | **{d[f'new_over_trl{k}']:.2f}** "
                f"| {d[f'today_over_trl{k}']:.2f} |")

    per = ", ".join(f"{x:.2f}" for x in rl["per_repeat_new_over_trl"])
    cold, warm = sf["break_even_steps_cold"], sf["break_even_steps_warm"]
    return [
        "## Engine (issue 25): new vs today's vs TRL, same work, one thread each",
        "",
        f"New engine: `{' '.join(e['engines']['new'])}` (precision resolved to {sf['new_precision']}); today's: "
        f"`{' '.join(e['engines']['today'])}`. Ratios are of medians over interleaved runs (lower is faster).",
        "",
        "| work | new engine | today's engine | TRL | new / today | new / TRL | today / TRL |",
        "|---|---|---|---|---|---|---|",
        line(f"SFT step, {s['sft_batch']} demonstrations (TRL: SFTTrainer), wall", sf),
        line("SFT step, CPU", sf, cpu=True),
        line(f"RL step, GRPO B={s['prompts_B']}×G={s['group_G']} (TRL: GRPOTrainer), wall", rl),
        line("RL step, CPU", rl, cpu=True),
        f"| decode, {s['prompts_B'] * s['group_G']} rows × ≤{s['max_new_tokens']} tokens, wall (TRL column: bare "
        f"`model.generate`, what GRPOTrainer calls) | {de['new_s']:.3f} s | {de['today_s']:.3f} s | "
        f"{de['generate_s']:.3f} s | **{de['new_over_today']:.2f}** | **{de['new_over_generate']:.2f}** | "
        f"{de['today_over_generate']:.2f} |",
        f"| decode, CPU | {de['new_cpu_s']:.3f} s | {de['today_cpu_s']:.3f} s | {de['generate_cpu_s']:.3f} s | "
        f"{de['new_over_today_cpu']:.2f} | {de['new_over_generate_cpu']:.2f} | |",
        "",
        f"- RL step goal ≤ {rl['goal_new_over_trl_at_most']}× TRL's: measured **{rl['new_over_trl']:.2f}×** "
        f"(per repeat: {per}); {'met' if rl['new_over_trl'] <= rl['goal_new_over_trl_at_most'] else 'not met'}.",
        f"- Compile time (first steps, dropped from the medians): SFT {_join(sf['compile_s'])} s, "
        f"RL {_join(rl['compile_s'])} s per run (the first RL run starts with an empty inductor cache, the others "
        f"reuse its graphs). Compiling pays off after {f'{cold:.0f}' if cold else 'never'} SFT steps with a cold "
        f"cache and {f'{warm:.0f}' if warm else 'never'} with a warm one (compile time / "
        f"{sf['saved_per_step_s']:.2f} s saved per step), hence `engine.compile=auto` compiles only stages of at "
        "least `engine.compile_min_steps` steps.",
        f"- Same loss curve: SFT loss per step, new vs today's engine from the same init on the same batches, "
        f"max |Δ| = {sf['loss_curve_max_abs_diff']:.4f} over {len(sf['loss_today'])} steps (tolerance "
        f"{sf['loss_tolerance']}: {'within' if sf['loss_curve_within_tolerance'] else 'OUTSIDE'}). RL: step 0 "
        f"draws the same rollouts on both engines; its entropy differs by {rl['entropy_step0_abs_diff']:.1e} "
        f"nats/token; mean "
        f"reward over the runs {rl['reward_mean_new']:.3f} (new) vs {rl['reward_mean_today']:.3f} (today).",
        f"- Decoding draws the same tokens on both KV caches: all variants {de['same_tokens_all_variants']}, greedy "
        f"{de['same_tokens_greedy']}, per-row seeded {de['same_tokens_row_seeded']}.",
        "",
    ]


def summarise(a, runs: dict[str, list[dict]], rollout: dict, flops: dict, command: str, wall: float,
              sft: dict[str, list[dict]]) -> dict:
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
    rollout_ours = [k / s for k, s in zip(rollout["today_tokens"], rollout["today_s"], strict=True)]
    rollout_plain = [k / s for k, s in zip(rollout["generate_tokens"], rollout["generate_s"], strict=True)]
    rollout_ours_cpu = [k / s for k, s in zip(rollout["today_tokens"], rollout["today_cpu_s"], strict=True)]
    rollout_plain_cpu = [k / s for k, s in zip(rollout["generate_tokens"], rollout["generate_cpu_s"], strict=True)]
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
            "sft_batch": a.sft_batch,
            "sft_steps_per_run": a.sft_steps,
            "sft_repeats": a.sft_repeats,
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
            "same_tokens": rollout["same_tokens_all_variants"],
            **rollout,
        },
        "engine": engine_summary(runs, sft, rollout),
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
        "today's engine (the table's `ours`); "
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
        *engine_markdown(r),
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
    ap.add_argument("--sft-steps", type=int, default=12, help="SFT steps per run (warm-up included)")
    ap.add_argument("--sft-batch", type=int, default=64, help="demonstrations per SFT step (the warm start's)")
    ap.add_argument("--sft-repeats", type=int, default=2, help="interleaved (today, new, TRL) SFT rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed (default: this one)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite speed.md (and the derived break-even figures) from an existing speed.json")
    a = ap.parse_args()

    if a.render_only:
        path = Path(a.results_dir) / "speed.json"
        result = json.loads(path.read_text())
        break_even(result["engine"])
        path.write_text(json.dumps(result, indent=2))
        (Path(a.results_dir) / "speed.md").write_text(markdown(result))
        return
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
        runs: dict[str, list[dict]] = {"ours": [], "ours_new": [], "trl": [], "amft": []}
        for rep in range(a.repeats):
            order = ("ours", "ours_new", "trl", "amft") if rep % 2 == 0 else ("trl", "ours_new", "ours", "amft")
            for name in order:
                python = a.trl_python if name == "trl" else sys.executable
                runs[name].append(_run_worker(a, name, work, python, rep))
        sft: dict[str, list[dict]] = {"sft_today": [], "sft_new": [], "sft_trl": []}
        for rep in range(a.sft_repeats):
            order = ("sft_today", "sft_new", "sft_trl") if rep % 2 == 0 else ("sft_trl", "sft_new", "sft_today")
            for name in order:
                python = a.trl_python if name == "sft_trl" else sys.executable
                sft[name].append(_run_worker(a, name, work, python, rep))
        rollout = _run_worker(a, "rollout", work, sys.executable, 0)
        flops = _run_worker(a, "flops", work, sys.executable, 0)
    result = summarise(a, runs, rollout, flops, command, time.perf_counter() - t_start, sft)
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
