"""Statistical and edge-case tests of the mixers that are too long for the notebook's inline tests (CPU, seconds)."""
import itertools
import math

import pytest
import torch

from motg.mixture import (CENSOR, Dirichlet, DifferentTokens, Fuzzy, GumbelSoft, Hard, MIXERS, Mixture, MixtureLM,
                          Multiplex, Soft, TRAINABLE_MIXERS, concrete_log_prob, embed, make_mixer, sample_dirichlet,
                          set_log_prob)
from motg.testing import tiny_lm

E3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])


def test_different_tokens_k3_frequencies_match_exact_log_prob():
    "Every (set, representative) outcome of k = 3 draws from 5 tokens: frequencies match exp(log_prob), which sums to 1."
    probs = torch.tensor([0.35, 0.25, 0.2, 0.15, 0.05])
    mixer = DifferentTokens(k=3, temperature=1.0)
    outcomes = [(s, r) for s in itertools.combinations(range(5), 3) for r in s]
    batch = Mixture(torch.tensor([s for s, _ in outcomes]), torch.zeros(len(outcomes), 3), None,
                    torch.tensor([r for _, r in outcomes]))
    expected = mixer.log_prob(probs.log().expand(len(outcomes), 5), batch, None).exp()
    assert abs(expected.sum().item() - 1) < 1e-5
    n = 60000
    draws = mixer.sample(probs.log().expand(n, 5), None, generator=torch.Generator().manual_seed(0))
    assert (draws.ids.sort(-1).values.diff(dim=-1) > 0).all()  # without replacement
    code = {o: i for i, o in enumerate(outcomes)}
    keys = torch.tensor([code[(tuple(sorted(s)), r)] for s, r in zip(draws.ids.tolist(), draws.token.tolist())])
    observed = torch.bincount(keys, minlength=len(outcomes)) / n
    assert torch.allclose(observed, expected, atol=0.006), (observed - expected).abs().max()


def test_gumbel_top_k_matches_torch_multinomial_without_replacement():
    "The sampler's ordered draws follow the same law as torch.multinomial(replacement=False)."
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 40000
    ours = DifferentTokens(k=2, temperature=1.0).sample(probs.log().expand(n, 4), None,
                                                         generator=torch.Generator().manual_seed(1)).ids
    theirs = torch.multinomial(probs.expand(n, 4), 2, generator=torch.Generator().manual_seed(2))
    count = lambda ids: torch.bincount(ids[:, 0] * 4 + ids[:, 1], minlength=16) / n  # ordered pairs
    assert torch.allclose(count(ours), count(theirs), atol=0.01)


def test_set_log_prob_gradcheck_and_full_vocabulary():
    logits = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3, 5], [4, 1, 2]])
    assert torch.autograd.gradcheck(lambda z: set_log_prob(z, ids), (logits,))
    # k = V: the set is certain, and the gradient stays finite (the mass outside S is empty)
    logits = torch.randn(3, 4, requires_grad=True)
    full = set_log_prob(logits, torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]]))
    full.sum().backward()
    assert torch.allclose(full, torch.zeros(3), atol=1e-5) and torch.isfinite(logits.grad).all()


# (not the soft_grpo_paper surrogate: its noise shift is held without gradient, so its value and gradient differ by design)
@pytest.mark.parametrize("name, params", [("dirichlet", {}), ("different_tokens", {}), ("soft", {}),
                                          ("multiplex", {}), ("gumbel_soft", dict(k=3, gumbel_temperature=0.5))])
def test_log_prob_gradcheck(name, params):
    mixer = make_mixer(name, **params)
    logits = torch.randn(3, 3, dtype=torch.float64)
    E = E3.double().requires_grad_()
    action = mixer.sample(logits, E.detach(), generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda z, e: mixer.log_prob(z, action, e), (logits.requires_grad_(), E))


def test_dirichlet_weights_have_the_dirichlet_law():
    "Quantiles of the generator-driven sampler match torch.distributions.Beta, also with a tiny concentration."
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for a, b in [(0.625, 0.375), (1.8, 0.2), (0.02, 0.98)]:
        ours = sample_dirichlet(torch.tensor([a, b]).expand(50000, 2), torch.Generator().manual_seed(0))[:, 0]
        torch.manual_seed(0)
        ref = torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample((50000,)).clamp_min(1e-38)
        if a < 0.1:  # most mass near 0: compare log-quantiles (float32 Beta underflows; ours is floored)
            ours, ref = ours.log(), ref.log()
            assert torch.allclose(ours.quantile(qs[2:]), ref.quantile(qs[2:]), rtol=0.1), (a, b)
        else:
            assert torch.allclose(ours.quantile(qs), ref.quantile(qs), atol=0.01), (a, b)


@pytest.mark.parametrize("gap, concentration", [(2.0, 1.0), (4.0, 1.0), (6.0, 1.0), (9.0, 1.0), (6.0, 3.0)])
def test_dirichlet_score_has_mean_zero_on_confident_logits(gap, concentration):
    """E[∂ log π/∂z] = 0 for an exact log-probability, also where most weights underflow float32 (censored):
    the density at the floored weight had a mean score of +0.99 on the second logit at gap 6."""
    n = 20000
    logits = torch.tensor([0.0, -gap, -12.0, -12.0]).repeat(n, 1).requires_grad_(True)
    mixer, E = make_mixer("dirichlet", concentration=concentration), torch.randn(4, 8)
    action = mixer.sample(logits.detach(), E, generator=torch.Generator().manual_seed(3))
    log_prob = mixer.log_prob(logits, action, E)
    assert torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    score = logits.grad[:, :2]
    assert (score.mean(0).abs() < 4 * score.std(0) / n**0.5 + 1e-3).all(), (score.mean(0), score.std(0) / n**0.5)
    if gap >= 6 and concentration == 1.0:
        assert (action.weights.min(-1).values < CENSOR).float().mean() > 0.8  # the censored branch is exercised


def test_extreme_logits_stay_finite():
    "float32 underflow of p: distinct ids from tokens of underflowed probability, finite log-probs and gradients."
    logits = torch.tensor([[0.0, -150.0, -300.0, -400.0]]).expand(8, 4)  # p = (1, 0, 0, 0) in float32 at τ = 0.9
    for mixer in [DifferentTokens(k=3), Dirichlet(k=3), DifferentTokens(k=2, objective="motg_paper")]:
        action = mixer.sample(logits, None, generator=torch.Generator().manual_seed(0))
        leaf = logits.clone().requires_grad_()
        logp = mixer.log_prob(leaf, action, None)
        logp.sum().backward()
        assert torch.isfinite(logp).all() and torch.isfinite(leaf.grad).all(), mixer
        assert (action.ids.sort(-1).values.diff(dim=-1) > 0).all(), mixer
    assert (DifferentTokens(k=3).sample(logits, None).ids[:, 0] == 0).all()  # the certain token is drawn first


def test_foreign_positions_can_be_masked_without_nan():
    "Answer-phase positions stored as k copies of the token (weights 1, 0) give finite values and gradients."
    logits = torch.randn(4, 6, requires_grad=True)
    token = torch.tensor([1, 2, 3, 4])
    copies = Mixture(token[:, None].repeat(1, 2), torch.tensor([[1.0, 0.0]]).repeat(4, 1), None, token)
    for mixer in [Dirichlet(), DifferentTokens(), DifferentTokens(objective="motg_paper"), Dirichlet(objective="motg_paper")]:
        logp = mixer.log_prob(logits, copies, None)
        masked = torch.where(torch.tensor([True, False, True, False]), logp, torch.zeros(4))
        logits.grad = None
        masked.sum().backward()
        assert torch.isfinite(logp).all() and torch.isfinite(logits.grad).all(), mixer


def test_low_precision_logits_and_embeddings():
    "bfloat16 logits and E: the log-probabilities are computed in float32."
    logits = torch.randn(2, 5, 3).bfloat16()
    for name in MIXERS:
        mixer = make_mixer(name, **({"top_k": 2} if name == "mixture_of_inputs" else {"k": 2} if name in
                                    ("dirichlet", "different_tokens", "soft_thinking", "gumbel_soft") else {}))
        action = mixer.sample(logits, E3.bfloat16(), generator=torch.Generator().manual_seed(0))
        assert embed(action, E3.bfloat16()).dtype == torch.bfloat16
        if mixer.trainable:
            logp = mixer.log_prob(logits, action, E3.bfloat16())
            assert logp.dtype == torch.float32 and torch.isfinite(logp).all(), name


def test_fuzzy_and_soft_sigma_is_fixed_by_the_first_embedding_matrix():
    mixer = Fuzzy()
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    action = mixer.sample(logits, E3, generator=torch.Generator().manual_seed(0))
    sigma = mixer.sigma
    assert abs(sigma - 0.33 * math.sqrt(10 / 6)) < 1e-7
    mixer.log_prob(logits, action, E3 * 10)  # a trained E later: σ does not move
    assert mixer.sigma == sigma and Soft(sigma=0.2, sigma_scale=5).noise_std(E3) == 0.2
    assert Soft(sigma_scale=0.1).noise_std(E3) == pytest.approx(0.1 * math.sqrt(10 / 6))
    assert torch.allclose(action.vector - E3[0], action.vector - mixer.greedy(logits, E3).vector)  # μ = E[argmax]


@pytest.mark.parametrize("name", TRAINABLE_MIXERS)
def test_teacher_forced_log_prob_equals_rollout_log_prob(name):
    "Sample step by step from the tiny model, then one teacher-forced forward over [batch, steps] gives the same log-probs."
    torch.manual_seed(0)
    model, tokenizer = tiny_lm()
    lm = MixtureLM(model).eval()
    E = lm.embedding_matrix()
    mixer = make_mixer(name)
    prompt = torch.tensor([tokenizer("12+3=")["input_ids"]] * 3)
    sequence = Mixture.from_tokens(prompt, vector_dim=E.shape[1] if mixer.uses_vector else None)
    generator, step_logps = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for _ in range(5):
            logits = lm(sequence).logits[:, -1]
            action = mixer.sample(logits, E, generator=generator)
            step_logps.append(mixer.log_prob(logits, action, E))
            if mixer.k > 1:  # widen the prompt's k = 1 tokens (weight 0 on the copies)
                if sequence.k == 1:
                    pad = lambda m: Mixture(m.ids.repeat_interleave(mixer.k, -1),
                                            torch.cat([m.weights, torch.zeros(*m.weights.shape[:-1], mixer.k - 1)], -1),
                                            m.vector, m.token)
                    sequence = pad(sequence)
            if action.vector is None and sequence.vector is not None:
                action = Mixture(action.ids, action.weights, torch.zeros_like(sequence.vector[:, 0]), action.token)
            sequence = Mixture(*(None if a is None else torch.cat([a, b.unsqueeze(1)], 1)
                                 for a, b in zip((sequence.ids, sequence.weights, sequence.vector, sequence.token),
                                                 (action.ids, action.weights, action.vector, action.token))))
    steps = 5
    logits = lm(sequence.map(lambda t: t[:, :-1])).logits[:, -steps:]  # the logits that produced each action
    actions = sequence.map(lambda t: t[:, -steps:])
    teacher_forced = mixer.log_prob(logits, actions, E)
    teacher_forced.sum().backward()
    assert torch.allclose(teacher_forced, torch.stack(step_logps, 1), atol=1e-4)
    assert E.grad is not None and E.grad.abs().sum() > 0  # through the model (and μ for soft/fuzzy)


def test_soft_mixture_stays_in_the_embedding_dtype():
    "bfloat16 E: μ = pE is computed in bfloat16 (no float32 copy of E), the noise and the log-density in float32."
    E = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    for mixer in [Soft(), Fuzzy()]:
        mean = mixer.mean(logits, E)
        assert mean.dtype == torch.bfloat16
        assert torch.allclose(mean.float(), mixer.mean(logits, E.detach().float()), atol=0.05)
        action, logp = mixer.sample_with_log_prob(logits, E.detach(), generator=torch.Generator().manual_seed(2))
        assert action.vector.dtype == torch.float32 and logp.dtype == torch.float32
        again = mixer.log_prob(logits.requires_grad_(), action, E)  # teacher forcing recomputes the same bf16 μ
        assert again.dtype == torch.float32 and torch.allclose(again, logp, atol=1e-3), (again - logp).abs().max()
        again.sum().backward()
        assert E.grad.dtype == torch.bfloat16 and E.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
        E.grad, logits.grad = None, None
        assert embed(action, E).dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_generator_on_another_device_is_refused(name):
    "A generator must live on the logits' device: meta logits (no data, no GPU needed) and a CPU generator."
    mixer = make_mixer(name)
    logits, E = torch.randn(2, 30).to("meta"), torch.randn(30, 4).to("meta")
    with pytest.raises(ValueError, match="generator: is on cpu, the logits on meta"):
        mixer.sample(logits, E, generator=torch.Generator())
    if mixer.trainable:
        with pytest.raises(ValueError, match="generator:"):
            mixer.sample_with_log_prob(logits, E, generator=torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_with_cuda_logits_is_refused_and_a_cuda_one_works():
    logits, E = torch.randn(4, 30, device="cuda"), torch.randn(30, 8, device="cuda")
    for name in MIXERS:
        mixer = make_mixer(name)
        with pytest.raises(ValueError, match="generator: is on cpu"):
            mixer.sample(logits, E, generator=torch.Generator())
        action = mixer.sample(logits, E, generator=torch.Generator(device="cuda").manual_seed(0))
        assert action.ids.device.type == "cuda"


def test_multiplex_k2_frequencies_duplicates_and_weights():
    "k = 2 of 4 tokens: all 16 ordered pairs at exp(log_prob); a repeated token keeps both slots (twice the share)."
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    mixer = Multiplex(k=2, temperature=0.8)
    logits = probs.log() * 0.8  # p = probs at τ = 0.8
    pairs = torch.tensor(list(itertools.product(range(4), repeat=2)))
    expected = mixer.log_prob(logits.expand(16, 4), Mixture(pairs, torch.zeros(16, 2), None, pairs[:, 0]), None).exp()
    assert torch.allclose(expected, (probs[pairs[:, 0]] * probs[pairs[:, 1]]), atol=1e-6)
    n = 60000
    draws = mixer.sample(logits.expand(n, 4), None, generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(draws.ids[:, 0] * 4 + draws.ids[:, 1], minlength=16) / n
    assert torch.allclose(observed, expected, atol=0.006)
    twice = draws.ids[:, 0] == draws.ids[:, 1]
    assert twice.any() and torch.allclose(draws.weights[twice], torch.full((int(twice.sum()), 2), 0.5))
    mixed = ~twice
    ratio = draws.weights[mixed, 0] / draws.weights[mixed, 1]
    assert torch.allclose(ratio, probs[draws.ids[mixed, 0]] / probs[draws.ids[mixed, 1]], rtol=1e-5)
    assert (Multiplex(weighting="uniform").sample(logits.expand(5, 4), None).weights == 1 / 3).all()


def test_gumbel_soft_density_matches_torch_and_the_histogram():
    "The exact log_prob is torch's RelaxedOneHotCategorical density where nothing is censored, and integrates the histogram."
    logits = torch.tensor([1.0, 0.2, -0.5, -3.0])
    mixer = GumbelSoft(k=3, temperature=0.7, gumbel_temperature=0.5)
    draws = mixer.sample(logits.expand(50000, 4), None, generator=torch.Generator().manual_seed(0))
    assert (draws.weights >= CENSOR).all()  # λ = 0.5: nothing underflows here
    p_tilde = torch.softmax(logits[:3] / 0.7, -1)
    reference = torch.distributions.RelaxedOneHotCategorical(torch.tensor(0.5), probs=p_tilde, validate_args=False)
    ours = mixer.log_prob(logits.expand(50000, 4), draws, None)
    assert torch.allclose(ours, reference.log_prob(draws.weights), atol=2e-3, rtol=1e-4)
    # the density of (w1, w2) on the simplex, integrated over a cell, is the cell's frequency
    w1, w2 = draws.weights[:, 0], draws.weights[:, 1]
    for lo1, lo2 in [(0.3, 0.1), (0.5, 0.2), (0.1, 0.6)]:
        h = 0.05
        frequency = ((w1 >= lo1) & (w1 < lo1 + h) & (w2 >= lo2) & (w2 < lo2 + h)).float().mean().item()
        grid = torch.stack(torch.meshgrid(torch.linspace(lo1, lo1 + h, 41)[:-1] + h / 80,
                                          torch.linspace(lo2, lo2 + h, 41)[:-1] + h / 80, indexing="ij"), -1).reshape(-1, 2)
        points = torch.cat([grid, 1 - grid.sum(-1, keepdim=True)], -1)
        mass = concrete_log_prob(p_tilde.log(), points, 0.5).exp().mean().item() * h * h
        assert abs(frequency - mass) < 4 * (mass / 50000) ** 0.5 + 1e-3, (lo1, lo2, frequency, mass)
    assert abs((draws.token == 0).float().mean() - p_tilde[0]) < 0.01  # argmax weight: Gumbel-max, ~ p̃


@pytest.mark.parametrize("gap", [2.0, 6.0, 12.0])
def test_gumbel_soft_score_has_mean_zero_with_censored_weights(gap):
    "E[∂ log π/∂z] = 0 at the default λ = 0.1, where most weights are censored (below 1e-30)."
    n = 20000
    logits = torch.tensor([0.0, -gap, -gap - 1, -12.0, -14.0, -30.0]).repeat(n, 1).requires_grad_(True)
    mixer = GumbelSoft()
    action = mixer.sample(logits.detach(), None, generator=torch.Generator().manual_seed(5))
    log_prob = mixer.log_prob(logits, action, None)
    assert torch.isfinite(log_prob).all() and (action.weights < CENSOR).float().mean() > 0.4
    log_prob.sum().backward()
    score = logits.grad[:, :3]
    assert (score.mean(0).abs() < 4 * score.std(0) / n**0.5 + 1e-3).all(), (score.mean(0), score.std(0) / n**0.5)


def test_gumbel_soft_paper_surrogate_is_finite_and_matches_sampling():
    "objective='soft_grpo_paper': finite values and gradients on confident and flat logits, also with censored weights."
    for logits in [torch.randn(64, 20), torch.tensor([0.0, -9.0, -20.0, -40.0, -60.0, -80.0]).expand(64, 6)]:
        mixer = GumbelSoft(objective="soft_grpo_paper")
        action, logp = mixer.sample_with_log_prob(logits, None, generator=torch.Generator().manual_seed(0))
        leaf = logits.clone().requires_grad_()
        again = mixer.log_prob(leaf, action, None)
        again.sum().backward()
        assert torch.allclose(again, logp) and torch.isfinite(again).all() and torch.isfinite(leaf.grad).all()
        assert (again <= -1 + 1e-6).all()  # −g − e^{−g} <= −1, with equality at g = 0


@pytest.mark.parametrize("name", ["multiplex", "gumbel_soft"])
def test_new_mixers_run_through_rollout_and_a_grpo_step(name):
    "generate -> sequence_logps (equal to the rollout's) -> grpo_loss -> an optimizer step that changes the model."
    from motg.grpo import grpo_loss
    from motg.rollout import generate, sequence_logps
    torch.manual_seed(0)
    model, tokenizer = tiny_lm()
    mixer = make_mixer(name)
    prompts = ["12+3=<think>", "7*8=<think>"] * 2
    for greedy in (True, False):
        r = generate(model, tokenizer, prompts, mixer, 16, torch.Generator().manual_seed(1), greedy=greedy,
                     max_think_tokens=8)
        assert r.think_mask.any() and r.mixtures.k == mixer.k
    logps = sequence_logps(model, r)
    assert torch.allclose(logps, r.logps, atol=1e-4), (logps - r.logps).abs().max()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = grpo_loss(logps, r.logps, None, advantages, r.completion_mask)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
