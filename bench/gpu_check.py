"""One prepared GPU check (run on the lent GPU machine; never in CI):

    python bench/gpu_check.py --out $OUT

1. environment: device, CUDA, bf16 support;
2. bf16 matmul peak (8192³) — the denominator of the utilisation figure below;
3. bf16-mixed training sanity: 60 SFT steps of the tiny model on General Points must cut the loss;
4. achieved FLOP/s of a training forward+backward of SmolLM2-135M's architecture (6·N·tokens / time)
   and its ratio to the measured matmul peak.
Step-time breakdowns come from bench/bench_step.py (run by bench/gpu_check.sh next to this).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sft_sanity() -> dict:
    from amft_lib.config import WarmStartConfig, apply_overrides
    from amft_lib.model import load_policy
    from amft_lib.tasks.general_points import generate_rows
    from amft_lib.warm_start import sft_steps

    cfg = apply_overrides(WarmStartConfig(), ["device=cuda", "engine.precision=bf16-mixed", "batch_size=64", "lr=3e-3"])
    model, tok = load_policy(cfg.model, device="cuda", seed=0)
    rows = generate_rows(1000, "face10", 1, "train")
    t = time.perf_counter()
    hist = sft_steps(model, tok, rows, 60, cfg, 0, "gpu-sanity")
    dt = time.perf_counter() - t
    first = sum(h["sft_loss"] for h in hist[:5]) / 5
    last = sum(h["sft_loss"] for h in hist[-5:]) / 5
    return {"steps": 60, "loss_first5": first, "loss_last5": last, "decreased": last < 0.7 * first,
            "steps_per_s": 60 / dt}


def train_flops(batch: int = 32, seq: int = 256) -> dict:
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step import SMOLLM2_ARCH

    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_ARCH)).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, SMOLLM2_ARCH["vocab_size"], (batch, seq), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / reps
    flops = 6 * n_params * batch * seq / dt
    return {"params": n_params, "batch": batch, "seq": seq, "step_s": dt, "achieved_flops": flops,
            "tokens_per_s": batch * seq / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assert torch.cuda.is_available(), "no CUDA device"
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "bf16_supported": torch.cuda.is_bf16_supported()}
    res["matmul_bf16_flops"] = matmul_peak()
    res["sft_sanity"] = sft_sanity()
    res["train_fwd_bwd"] = train_flops()
    fwd_bwd = res["train_fwd_bwd"]
    fwd_bwd["utilisation_of_matmul_peak"] = fwd_bwd["achieved_flops"] / res["matmul_bf16_flops"]
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
