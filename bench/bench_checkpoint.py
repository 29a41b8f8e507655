"""Checkpoint save/load throughput to SeaweedFS vs plain boto3 on the same bytes.

    .venv/bin/python bench/bench_checkpoint.py                      # ~540 MB SmolLM2-135M-like + ~5 MB LoRA
    .venv/bin/python bench/bench_checkpoint.py --sizes-mb 100 --repeats 5 --json bench/out/ckpt.json

What is compared, per state-dict size:
- save: ``checkpoint.save_checkpoint`` (serialise to safetensors/torch files in a temp dir, sha256 every
  file, upload, manifest, LATEST) vs ``boto3 upload_file`` of the very same files, already on disk;
- load: ``checkpoint.load_checkpoint`` (download, verify sha256, deserialise) vs ``boto3 download_file``
  of the same objects, and ("load*") vs download_file followed by sha256 of each file: the cheapest
  way to get the same integrity guarantee with plain boto3. On a CPU-bound box hashing cannot hide
  behind the transfer, so "load" shows the price of verification and "load*" how well it is paid.
MB/s = checkpoint bytes (all files) / wall time; ratio = amft / boto3 (target >= 0.8: the integrity
and atomicity work should cost at most 20 % over a bare copy). Median of ``--repeats`` runs.

By default an embedded SeaweedFS is started in a temp dir; ``--use-env`` uses the AWS_* environment
(any S3) instead. Not a test: run it by hand, numbers depend on the disk and cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from amft_lib import checkpoint, storage
from amft_lib.checkpoint import CheckpointPayload

MB = 1_000_000

# SmolLM2-135M: vocab 49152, hidden 576, 30 layers, 9 query / 3 kv heads of 64, MLP 1536, tied embeddings.
VOCAB, HIDDEN, LAYERS, KV, MLP = 49152, 576, 30, 192, 1536


def full_model_state(target_mb: float) -> dict[str, torch.Tensor]:
    """fp32 tensors with SmolLM2-135M's shapes; layers are repeated/trimmed to reach ``target_mb``."""
    state = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN)}
    per_layer = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (KV, HIDDEN),
        "self_attn.v_proj.weight": (KV, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (MLP, HIDDEN),
        "mlp.up_proj.weight": (MLP, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, MLP),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }
    layer = 0
    while sum(t.numel() * 4 for t in state.values()) < target_mb * MB:
        for name, shape in per_layer.items():
            state[f"model.layers.{layer}.{name}"] = torch.randn(*shape)
        layer += 1
    state["model.norm.weight"] = torch.ones(HIDDEN)
    return state


def lora_state(target_mb: float) -> dict[str, torch.Tensor]:
    """LoRA A/B pairs on q, k, v, o of 30 layers; the rank is chosen to reach ``target_mb``."""
    outs = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}
    per_rank = LAYERS * sum(HIDDEN + out for out in outs.values()) * 4
    rank = max(1, round(target_mb * MB / per_rank))
    state = {}
    for layer in range(LAYERS):
        for proj, out in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN)
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, rank)
    return state


def payload_for(model_state: dict[str, torch.Tensor]) -> CheckpointPayload:
    return CheckpointPayload(
        model_state=model_state,
        optimizer_state={"state": {}, "param_groups": [{"lr": 1e-5, "params": []}]},
        scheduler_state={"last_epoch": 0},
        controller_state={"mu": 0.5},
        rng_state=checkpoint.capture_rng_state(),
        trainer_state={"step": 0},
    )


def boto_client(config: storage.S3Config):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        config=Config(s3={"addressing_style": "path"}),
    )


def bench_size(label: str, state: dict[str, torch.Tensor], base: str, config: storage.S3Config, repeats: int) -> dict:
    payload = payload_for(state)
    client = boto_client(config)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="amft-bench-") as scratch:
        staged = Path(scratch, "staged")
        staged.mkdir()
        checkpoint.files._stage(payload, str(staged), 0)  # the exact files a save uploads, for the baseline
        files = sorted(staged.iterdir())
        down = Path(scratch, "down")
        down.mkdir()
        nbytes = sum(f.stat().st_size for f in files)

        for i in range(repeats):
            root = storage.join(base, f"{label}-{i}")
            uri = checkpoint.checkpoint_uri(root, 1)
            bucket, key = storage.split_s3(storage.join(base, f"{label}-{i}-boto3"))

            def amft_save(root: str = root) -> None:
                checkpoint.save_checkpoint(root, 1, payload, "bench", keep_last=10)

            def boto3_upload(bucket: str = bucket, key: str = key) -> None:
                for f in files:
                    client.upload_file(str(f), bucket, f"{key}/{f.name}")

            def amft_load(uri: str = uri) -> None:
                checkpoint.load_checkpoint(uri)

            def boto3_download(bucket: str = bucket, key: str = key, sha: bool = False) -> None:
                for f in files:
                    client.download_file(bucket, f"{key}/{f.name}", str(down / f.name))
                    if sha:  # the integrity check a resume needs, done the plain way
                        storage.sha256_file(down / f.name)

            def boto3_download_sha() -> None:
                boto3_download(sha=True)

            # Alternate who goes first, and flush dirty pages before each timing, so neither side
            # pays for the other's write-back.
            for group in ((amft_save, boto3_upload), (amft_load, boto3_download, boto3_download_sha)):
                for op in group if i % 2 == 0 else reversed(group):
                    os.sync()
                    t = time.perf_counter()
                    op()
                    times.setdefault(op.__name__, []).append(time.perf_counter() - t)
                    print(f"[bench] {label} run {i}: {op.__name__} {times[op.__name__][-1]:.2f}s", file=sys.stderr)
            storage.delete_prefix(root)
            storage.delete_prefix(storage.join(base, f"{label}-{i}-boto3"))
    med = {k: statistics.median(v) for k, v in times.items()}
    mbps = {k: nbytes / MB / v for k, v in med.items()}
    return {
        "label": label,
        "bytes": nbytes,
        "repeats": repeats,
        "seconds": med,
        "mb_per_s": mbps,
        "ratio_save": mbps["amft_save"] / mbps["boto3_upload"],
        "ratio_load": mbps["amft_load"] / mbps["boto3_download"],
        "ratio_load_vs_verified": mbps["amft_load"] / mbps["boto3_download_sha"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[540.0], help="full-model state sizes, MB")
    parser.add_argument("--lora-mb", type=float, nargs="*", default=[5.0], help="LoRA adapter sizes, MB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the median is reported")
    parser.add_argument("--use-env", action="store_true", help="use the AWS_* env instead of an embedded server")
    parser.add_argument("--bucket", default="amft", help="bucket (embedded server creates it)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    with ExitStack() as stack:
        if args.use_env:
            config = storage.S3Config.from_env()
        else:
            from amft_lib.s3server import embedded_s3

            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="amft-bench-s3-"))
            settings = stack.enter_context(embedded_s3(data_dir, bucket=args.bucket))
            os.environ.update(settings.env())
            config = storage.S3Config.from_env()
        base = f"s3://{args.bucket}/bench/{int(time.time())}"
        torch.manual_seed(0)
        cases = [(f"full-{s:g}MB", full_model_state(s)) for s in args.sizes_mb]
        cases += [(f"lora-{s:g}MB", lora_state(s)) for s in args.lora_mb]
        results = []
        for label, state in cases:
            print(f"[bench] {label}: {len(state)} tensors …", file=sys.stderr, flush=True)
            results.append(bench_size(label, state, base, config, args.repeats))

    print(f"\ncheckpoint throughput, median of {args.repeats} (MB = 10^6 bytes; endpoint {config.endpoint_url})")
    header = (
        f"{'state':<14}{'MB':>9}  {'op':<5}{'amft s':>9}{'amft MB/s':>11}{'boto3 s':>9}{'boto3 MB/s':>12}{'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        for op, ours, theirs, ratio in (
            ("save", "amft_save", "boto3_upload", r["ratio_save"]),
            ("load", "amft_load", "boto3_download", r["ratio_load"]),
            ("load*", "amft_load", "boto3_download_sha", r["ratio_load_vs_verified"]),
        ):
            print(
                f"{r['label']:<14}{r['bytes'] / MB:>9.1f}  {op:<5}"
                f"{r['seconds'][ours]:>9.2f}{r['mb_per_s'][ours]:>11.0f}"
                f"{r['seconds'][theirs]:>9.2f}{r['mb_per_s'][theirs]:>12.0f}{ratio:>7.2f}"
            )
    print("save: vs upload_file of the staged files; load: vs download_file; load*: vs download_file + sha256")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
