"""Rewards and greedy accuracy: the only place model outputs meet the task verifiers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from amft_lib.rollout import sample_completions
from amft_lib.tasks.base import Task


def score_completions(task: Task, answers: Sequence[str], texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
    """R(τ) ∈ {0, 1} per completion ([N] float tensor) and whether each had a parsable answer."""
    verdicts = [task.verify(a, t) for a, t in zip(answers, texts, strict=True)]
    return torch.tensor([v.reward for v in verdicts], dtype=torch.float32), [v.format_ok for v in verdicts]


@dataclass
class GreedyEval:
    accuracy: float  # pass@1 with greedy decoding
    format_error_rate: float
    mean_response_tokens: float
    n: int
    samples: list[dict]  # a few (prompt, completion, reward) for humans to read


@torch.no_grad()
def greedy_eval(
    model,
    tokenizer,
    task: Task,
    rows: Sequence[dict],
    max_new_tokens: int,
    chat_template: bool = False,
    n_samples: int = 4,
    batch_size: int = 128,
    synced: bool = False,
) -> GreedyEval:
    """pass@1 under greedy decoding on `rows` (dataset rows with `prompt` and `answer`).
    synced: keep stepping until every rank is done (FSDP2, see `sample_completions`)."""
    if not rows:
        return GreedyEval(0.0, 0.0, 0.0, 0, [])
    batch = sample_completions(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        group_size=1,
        max_new_tokens=max_new_tokens,
        greedy=True,
        chat_template=chat_template,
        batch_size=batch_size,
        synced=synced,
    )
    rewards, format_ok = score_completions(task, [r["answer"] for r in rows], batch.texts)
    samples = [
        {"id": r.get("id"), "prompt": r["prompt"], "completion": t, "reward": float(x)}
        for r, t, x in list(zip(rows, batch.texts, rewards.tolist(), strict=True))[:n_samples]
    ]
    return GreedyEval(
        accuracy=float(rewards.mean()),
        format_error_rate=1.0 - sum(format_ok) / len(format_ok),
        mean_response_tokens=float(batch.completion_mask.sum(-1).mean()),
        n=len(rows),
        samples=samples,
    )
