"""Turning prompts into scored token tensors: batched sampling (HF generate with KV cache) and the
teacher-forced forward that gives per-token log-probs and entropies.

Layout shared by rollouts and SFT batches (N = sequences, P = prompt length, L = completion length):
    prompt_ids [N, P] left-padded, prompt_mask [N, P]
    completion_ids [N, L] right-padded, completion_mask [N, L] (1.0 up to and including EOS)
so one function, `completion_logprobs`, scores both. The generation backend is isolated in
`sample_completions`; a vLLM engine can replace it without touching the losses or the trainer.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from amft_lib.losses import token_entropy, token_logprobs


@dataclass
class TokenBatch:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L] right-padded
    completion_mask: torch.Tensor  # [N, L] float, 1.0 on counted completion tokens (EOS included)
    texts: list[str]  # decoded completions, EOS and padding stripped

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def slice(self, start: int, stop: int) -> TokenBatch:
        return TokenBatch(
            self.prompt_ids[start:stop],
            self.prompt_mask[start:stop],
            self.completion_ids[start:stop],
            self.completion_mask[start:stop],
            self.texts[start:stop],
        )

    @property
    def n_tokens(self) -> int:
        return int(self.completion_mask.sum())


# prompt → its chat-templated text, per tokenizer: each distinct prompt is rendered once per process, in the
# bounded child of model_files.render_chat_prompts (the first batch is every prompt, from check_prompts_fit)
_RENDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def render_prompts(tokenizer, prompts: Sequence[str], chat_template: bool) -> list[str]:
    """The text the model sees for each prompt: the prompt itself, or with `chat_template` (and a tokenizer
    that has one) its chat template applied to one user message. A model's template is its author's code:
    it runs in a bounded child process (model_files.render_chat_prompts), never in the trainer's, and only
    for prompts not rendered before."""
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return list(prompts)
    from amft_lib.model_files import render_chat_prompts

    cache = _RENDERED.setdefault(tokenizer, {})
    missing = list(dict.fromkeys(p for p in prompts if p not in cache))
    if missing:
        cache.update(zip(missing, render_chat_prompts(tokenizer, missing), strict=True))
    return [cache[p] for p in prompts]


def render_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    return render_prompts(tokenizer, [prompt], chat_template)[0]


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask; BOS first when the tokenizer has one and no template adds it."""
    rows = []
    for text in render_prompts(tokenizer, prompts, chat_template):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer.bos_token_id is not None and not chat_template and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id, *ids]
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _completion_tensors(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1.0
    return ids, mask


def demonstration_batch(
    tokenizer, prompts: Sequence[str], demos: Sequence[str], max_tokens: int, chat_template: bool = False
) -> TokenBatch:
    """Prompt + demonstration + EOS as a TokenBatch for the SFT loss (demos cut to max_tokens)."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, chat_template)
    rows = [
        [*tokenizer.encode(d, add_special_tokens=False)[: max_tokens - 1], tokenizer.eos_token_id] for d in demos
    ]
    completion_ids, completion_mask = _completion_tensors(rows, tokenizer.pad_token_id)
    return TokenBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, list(demos))


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    group_size: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    chat_template: bool = False,
    batch_size: int = 256,
    seeds: Sequence[int] | None = None,
    synced: bool = False,
    kv_cache: str | None = None,
) -> TokenBatch:
    """G completions per prompt, groups contiguous: rows [i*G, (i+1)*G) belong to prompts[i].

    seeds: one per output row (`row_seeds`). Row i is then drawn from its own generator, so what a
    row samples depends on its seed only — not on which other rows share the batch, the batch size,
    the world size or whether the run was resumed. That is what makes a 2-rank run sample the same
    rollouts as a 1-rank run of the same global batch. Without seeds the global torch RNG is used.
    synced: every rank keeps stepping until all ranks are done (HF `synced_gpus`), as FSDP2 needs:
    each forward is a collective.
    top_k is forced off: HF's default top_k=50 would silently truncate the distribution the
    log-probs assume.
    kv_cache: `preallocated` (decode.PreallocatedCache: the same tokens without DynamicCache's per-token
    concatenation) or `dynamic`; None: the enclosing `kv_cache_mode` (Policy.sampling sets the stage's
    `engine.kv_cache`), `preallocated` outside one. FSDP2's synced generation keeps `dynamic`.
    """
    from transformers import GenerationConfig

    from amft_lib.decode import PreallocatedCache, supports_preallocated_cache  # lazy: imports transformers

    device = next(model.parameters()).device
    expanded = [p for p in prompts for _ in range(group_size)]
    per_row = seeds is not None and not greedy
    if per_row and len(seeds) != len(expanded):
        raise ValueError(f"{len(seeds)} seeds for {len(expanded)} rows")
    gen_cfg = GenerationConfig(
        do_sample=not greedy and not per_row,  # per-row sampling is argmax over Gumbel-perturbed logits
        temperature=None if greedy or per_row else temperature,
        top_p=None if greedy or per_row else top_p,
        top_k=None if greedy or per_row else 0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    preallocate = (kv_cache or _KV_CACHE.get()) == "preallocated" and not synced and supports_preallocated_cache(model)

    def extra(start: int, prompt_width: int) -> dict:
        """generate() arguments only where they apply (any HF-compatible `generate` takes the rest)."""
        kwargs: dict = {"synced_gpus": True} if synced else {}
        if preallocate:
            kwargs["cache"] = PreallocatedCache(prompt_width + max_new_tokens)
        if per_row:
            kwargs["logits_processor"] = _seeded_sampling(seeds[start : start + batch_size], temperature, top_p)
        return kwargs

    was_training = model.training
    model.eval()
    prompt_ids_all, prompt_mask_all, completions = [], [], []
    try:
        for start in range(0, len(expanded), batch_size):
            prompt_ids, prompt_mask = encode_prompts(tokenizer, expanded[start : start + batch_size], chat_template)
            out = model.generate(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                generation_config=gen_cfg,
                **extra(start, prompt_ids.shape[1]),
            )
            new = out[:, prompt_ids.shape[1] :].cpu()
            for row in new.tolist():
                # keep everything up to and including the first EOS; drop the padding after it
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                completions.append(row)
            prompt_ids_all.append(prompt_ids)
            prompt_mask_all.append(prompt_mask)
    finally:
        model.train(was_training)
    width = max(p.shape[1] for p in prompt_ids_all)
    prompt_ids = torch.cat([_left_pad(p, width, tokenizer.pad_token_id) for p in prompt_ids_all])
    prompt_mask = torch.cat([_left_pad(m, width, 0) for m in prompt_mask_all])
    completion_ids, completion_mask = _completion_tensors(completions, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(
        [[t for t in row if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)] for row in completions],
        skip_special_tokens=True,
    )
    return TokenBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, texts)


_KV_CACHE: contextvars.ContextVar[str] = contextvars.ContextVar("amft_kv_cache", default="preallocated")


@contextlib.contextmanager
def kv_cache_mode(mode: str) -> Iterator[None]:
    """The KV cache sample_completions uses inside this block when not told (`engine.kv_cache`).

    Why a context and not an argument everywhere: rollouts, rejection sampling, H* and greedy evaluation
    all sample inside the loops' `Policy.sampling()`, which sets it once for the stage."""
    token = _KV_CACHE.set(mode)
    try:
        yield
    finally:
        _KV_CACHE.reset(token)


def row_seeds(seed: int, stream: str, step: int, first_row: int, n: int) -> list[int]:
    """Seeds of rows first_row … first_row+n−1 of the global batch of `stream` ("rollout", "meta",
    "eval") at `step`: a hash, so streams and steps never share a seed and no state needs saving."""
    def one(row: int) -> int:
        digest = hashlib.blake2b(f"{seed}/{stream}/{step}/{row}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63

    return [one(first_row + i) for i in range(n)]


def _seeded_sampling(seeds: Sequence[int], temperature: float, top_p: float):
    """Logits processors that turn HF's greedy decoding into sampling from softmax(logits/T) (after
    top-p) with one generator per row: argmax(logits + Gumbel noise) is an exact categorical sample."""
    from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    class GumbelNoise(LogitsProcessor):
        def __init__(self) -> None:
            self.generators: list[torch.Generator] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if not self.generators:  # created on first use, on the device the logits live on
                self.generators = [torch.Generator(scores.device).manual_seed(s) for s in seeds]
            u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                             for g in self.generators])
            gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(u.dtype).tiny)))
            return scores.float() + gumbel

    processors: list = [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList([*processors, GumbelNoise()])


def _left_pad(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype)
    return torch.cat([pad, x], dim=1)


def completion_logprobs(
    model, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log π(completion_t | prompt, completion_<t): [N, L] (and entropy [N, L]).

    Position ids follow the attention mask, as in generation, so left padding does not shift the
    positions the policy saw while sampling.
    """
    device = next(model.parameters()).device
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).to(device)  # [N, P+L]
    attn = torch.cat([batch.prompt_mask, batch.completion_mask.long().clamp(max=1)], dim=1).to(device)
    # Tokens after EOS are padding: give them attention 0; they are masked from every loss anyway.
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False).logits
    P, L = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    logits = logits[:, P - 1 : P + L - 1]  # [N, L, V]: the logit at position t predicts token t+1
    targets = batch.completion_ids.to(device)
    logprobs = token_logprobs(logits, targets, temperature)
    entropy = token_entropy(logits.detach(), temperature) if with_entropy else None
    return logprobs, entropy
