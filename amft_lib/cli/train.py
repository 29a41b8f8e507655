"""`amft train`: run the trainer from a YAML config with a few common overrides."""

from __future__ import annotations

import argparse
import sys

from amft_lib.config import BASELINES, METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a policy with AMFT or one of its baselines",
        description=f"Train with AMFT (or {', '.join(BASELINES)}) from a YAML config. "
        "Writes metrics.jsonl, controller.jsonl, samples.jsonl, config.yaml and model/ under --out.",
    )
    p.add_argument("--config", help="YAML config (see configs/); defaults are used when omitted")
    p.add_argument("--out", help="output directory (required unless --help-config)")
    p.add_argument("--method", choices=METHODS, help="override controller.method")
    p.add_argument("--task", help="override data.task")
    p.add_argument("--model", help="override model.name (tiny, smollm2-135m or a local HF directory)")
    p.add_argument("--init-model", help="start from this HF directory (e.g. the warm-start model)")
    p.add_argument("--data", help="override data.path (dataset directory, parquet file or s3:// URI)")
    p.add_argument("--max-steps", type=int, help="override max_steps")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set controller.eta_mu=0.1 (repeatable)")
    p.add_argument("--checkpoint-root", help="run root for checkpoints (local path or s3://BUCKET/PREFIX/runs/RUN_ID)")
    p.add_argument("--resume", default="never", help="never | auto | URI of one checkpoint (default: never)")
    p.add_argument("--force-resume", action="store_true", help="resume even if the config hash differs")
    p.add_argument("--force-restart", action="store_true",
                   help="with --resume auto, start from step 0 even if every checkpoint under --checkpoint-root is "
                   "corrupt (otherwise refused, listing each checkpoint and why)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.set_defaults(handler=_train)

    w = sub.add_parser(
        "warm-start",
        help="SFT warm-up → rejection sampling → SFT on demos ∪ accepted (AMFT.md §3)",
        description="Build the warm-start model. Writes model/, accepted.parquet, sft_history.jsonl and "
        "stats.json (acceptance rates, pass@k, H*) under --out.",
    )
    w.add_argument("--config", help="YAML WarmStartConfig; defaults are used when omitted")
    w.add_argument("--out", required=True, help="output directory")
    w.add_argument("--model", help="override model.name")
    w.add_argument("--task", help="override data.task")
    w.add_argument("--data", help="override data.path")
    w.add_argument("--seed", type=int, help="override seed")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    w.add_argument("--checkpoint-root", help="run root for checkpoints, kept under <root>/warm_start/checkpoints/ "
                   "every checkpoint_every steps (local path or s3://BUCKET/PREFIX/runs/RUN_ID)")
    w.add_argument("--resume", default="never", help="never | auto | URI of one checkpoint (default: never)")
    w.add_argument("--force-resume", action="store_true", help="resume even if the config hash differs")
    w.set_defaults(handler=_warm_start)


_FLAG_KEYS = (("method", "controller.method"), ("task", "data.task"), ("model", "model.name"),
              ("data", "data.path"), ("max_steps", "max_steps"), ("seed", "seed"))


def _load(args: argparse.Namespace, cls: type):
    """Config from --config (or defaults), then the named flags, then --set overrides."""
    from amft_lib.config import apply_overrides, load_config

    cfg = load_config(args.config, cls) if args.config else cls()
    overrides = list(args.set)
    for flag, key in _FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return apply_overrides(cfg, overrides)


def _warm_start(args: argparse.Namespace) -> int:
    from amft_lib.config import WarmStartConfig

    cfg = _load(args, WarmStartConfig)  # a ConfigError is a UserError: one `error:` line from amft_lib.cli
    from amft_lib.warm_start import run_warm_start

    error = _resume_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    r = run_warm_start(cfg, args.out, checkpoint_root=args.checkpoint_root, resume=args.resume,
                       force_resume=args.force_resume)
    if not _is_rank0():  # under torchrun: one summary line, from rank 0
        return 0
    print(f"acceptance_rate={r.acceptance_rate:.3f} pass_at_{cfg.rs_samples}={r.pass_at_k:.3f} "
          f"target_entropy={r.target_entropy:.3f} val_accuracy={r.val_accuracy} model={r.model_dir}")
    return 0


def _is_rank0() -> bool:
    from amft_lib.distributed import world_from_env

    return world_from_env()[0] == 0


def _resume_error(args: argparse.Namespace) -> str | None:
    """What is wrong with --resume / --checkpoint-root, or None."""
    if args.resume not in ("never", "auto") and not args.resume.strip():
        return "--resume takes never, auto or a checkpoint URI"
    if args.resume == "auto" and not args.checkpoint_root:
        return "--resume auto needs --checkpoint-root"
    return None


def _train(args: argparse.Namespace) -> int:
    from amft_lib.config import TrainConfig, config_to_dict, describe

    if args.help_config:  # with --config/--set: the values this run would use, and the defaults they replace
        values = config_to_dict(_load(args, TrainConfig))
        for key, default, text in describe():
            value = values
            for part in key.split("."):
                value = value[part]
            shown = repr(value) if repr(value) == default else f"{value!r}  (default {default})"
            print(f"{key} = {shown}\n    {text}")
        return 0
    if not args.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    cfg = _load(args, TrainConfig)
    from amft_lib.trainer import run_train

    if args.resume != "never" and args.resume != "auto" and not args.resume.strip():
        print("error: --resume takes never, auto or a checkpoint URI", file=sys.stderr)
        return 2
    if args.resume == "auto" and not args.checkpoint_root:
        print("error: --resume auto needs --checkpoint-root", file=sys.stderr)
        return 2
    result = run_train(cfg, args.out, init_model=args.init_model, progress=not args.no_progress,
                   checkpoint_root=args.checkpoint_root, resume=args.resume, force_resume=args.force_resume,
                   force_restart=args.force_restart)
    if not _is_rank0():
        return 0
    print(
        f"method={cfg.controller.method} steps={result.steps} val_reward {result.val_reward_initial:.3f} -> "
        f"{result.val_reward_final:.3f} val_accuracy {result.val_accuracy_initial:.3f} -> "
        f"{result.val_accuracy_final:.3f} mu_final={result.mu_final:.3f} model={result.model_dir}"
    )
    return 0
