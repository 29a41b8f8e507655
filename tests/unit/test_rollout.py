"""amft_lib.rollout (mirror test): prompt encoding, the SFT batch, per-row seeds, teacher-forced log-probs and
seeded sampling, on the real `tiny` model and its character tokenizer (1 token = 1 character)."""

from __future__ import annotations

import torch

from amft_lib.config import ModelConfig
from amft_lib.model import build_char_tokenizer, load_policy
from amft_lib.rollout import completion_logprobs, demonstration_batch, encode_prompts, row_seeds, sample_completions

TINY = ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2)


def test_prompts_are_left_padded_with_bos_first():
    tok = build_char_tokenizer()
    ids, mask = encode_prompts(tok, ["ab", "abcd"])
    # "ab" → [BOS, a, b] padded on the left to the width of [BOS, a, b, c, d] (5)
    assert ids.shape == mask.shape == (2, 5)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert ids[0, 2].item() == ids[1, 0].item() == tok.bos_token_id
    assert tok.decode(ids[1, 1:].tolist()) == "abcd"


def test_demonstrations_end_in_eos_are_cut_to_max_tokens_and_masked():
    tok = build_char_tokenizer()
    batch = demonstration_batch(tok, ["p", "q"], ["12", "123456"], max_tokens=4)
    # "12" + EOS = 3 tokens; "123456" is cut to max_tokens − 1 = 3 characters, then EOS: 4 tokens
    assert batch.completion_mask.tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert batch.completion_ids[0, 2].item() == batch.completion_ids[1, 3].item() == tok.eos_token_id
    assert tok.decode(batch.completion_ids[1, :3].tolist()) == "123"
    assert batch.n_tokens == 7 and len(batch) == 2
    part = batch.slice(1, 2)
    assert len(part) == 1 and part.n_tokens == 4 and part.texts == ["123456"]


def test_row_seeds_depend_on_seed_stream_step_and_row_only():
    a = row_seeds(0, "rollout", 3, 10, 4)
    assert a == row_seeds(0, "rollout", 3, 10, 4)  # no hidden state: recomputed, not drawn
    assert a[1:] == row_seeds(0, "rollout", 3, 11, 3)  # a row's seed does not depend on where its batch starts
    others = [row_seeds(1, "rollout", 3, 10, 4), row_seeds(0, "eval", 3, 10, 4), row_seeds(0, "rollout", 4, 10, 4)]
    assert all(not set(a) & set(o) for o in others)
    assert all(0 <= s < 2**63 for s in a)


def test_completion_logprobs_are_the_teacher_forced_log_softmax():
    model, tok = load_policy(TINY, seed=0)
    model.eval()
    batch = demonstration_batch(tok, ["3 4", "12 2 1"], ["7", "x=9"], max_tokens=8)
    logprobs, entropy = completion_logprobs(model, batch, temperature=2.0, with_entropy=True)
    # by hand for row 1 (the longer prompt, no padding): logits at position P−1+t predict completion token t
    ids = torch.cat([batch.prompt_ids[1], batch.completion_ids[1]])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0] / 2.0
    P = batch.prompt_ids.shape[1]
    n = int(batch.completion_mask[1].sum())
    expected = torch.log_softmax(logits[P - 1 : P - 1 + n], -1).gather(-1, ids[P : P + n, None])[:, 0]
    torch.testing.assert_close(logprobs[1, :n], expected, rtol=1e-5, atol=1e-5)
    p = torch.softmax(logits[P - 1], -1)
    torch.testing.assert_close(entropy[1, 0], -(p * p.log()).sum(), rtol=1e-5, atol=1e-5)
    # row 0 is left-padded: the positions follow the mask, so padding does not change its log-probs
    alone = demonstration_batch(tok, ["3 4"], ["7"], max_tokens=8)
    lp_alone, _ = completion_logprobs(model, alone, temperature=2.0)
    torch.testing.assert_close(logprobs[0, :2], lp_alone[0, :2], rtol=1e-5, atol=1e-5)


def test_seeded_sampling_gives_each_row_its_own_stream():
    model, tok = load_policy(TINY, seed=0)
    seeds = row_seeds(0, "rollout", 0, 0, 4)
    both = sample_completions(model, tok, ["1 2", "3 4"], group_size=2, max_new_tokens=6, seeds=seeds)
    again = sample_completions(model, tok, ["3 4"], group_size=2, max_new_tokens=6, seeds=seeds[2:])
    assert len(both) == 4 and both.completion_ids.shape[1] <= 6
    assert both.texts[2:] == again.texts  # the same seeds give the same completions, whatever the batch
