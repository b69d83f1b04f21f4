"""Classifier-free guidance (chapter 13): `samplers.sample(..., labels=, guidance_scale=)` for every sampler,
`drop_labels` and `CFGLoss`, and the shipped conditional models sampled with guidance."""
import math

import pytest
import torch
from torch import nn

from diffcourse.schedules import NoiseSchedule
from diffcourse.samplers import sample, SAMPLERS, n_model_calls, sigmas_for, sampler_timesteps
from diffcourse.unet import ResUNet
from diffcourse.dit import DiT
from diffcourse.guidance import drop_labels, CFGLoss
from diffcourse.ddpm import DiffusionLoss

SCHED = NoiseSchedule.cosine(1000)


def _net(seed=0, cls=ResUNet, **kw):
    torch.manual_seed(seed)
    if cls is ResUNet: m = ResUNet(in_channels=2, channels=(16,), attention=(False,), num_classes=3, norm_groups=4, **kw)
    else: m = DiT(in_channels=2, image_size=8, patch_size=4, size='T', depth=1, num_classes=3, **kw)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.05)     # no zero-initialised output: ε̂ depends on the label
    return m.eval()


class Counting(nn.Module):
    "Wraps a model, records the batch size and labels of every call, and declares the wrapped model's num_classes."
    def __init__(self, m): super().__init__(); self.m, self.num_classes, self.calls = m, m.num_classes, []
    def forward(self, x, t, labels=None): self.calls.append((len(x), None if labels is None else labels.clone())); return self.m(x, t, labels=labels)


def _separate(m, w):
    "The guided ε̂ computed the slow way: two separate model calls, combined as ε_u + w (ε_c - ε_u)."
    def f(x, t, labels):
        e_c = m(x, t, labels=labels)
        e_u = m(x, t, labels=torch.full_like(labels, m.num_classes))
        return e_u + w * (e_c - e_u)
    return f


X = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize('cls', [ResUNet, DiT])
@pytest.mark.parametrize('sampler', SAMPLERS)
def test_batched_halves_equal_separate_predictions(sampler, cls):
    "One batched call per step gives what two separate calls give, for every sampler (and every channel of ε̂)."
    m = _net(cls=cls)
    e_c, e_u = m(X, torch.full((4,), 500), labels=Y), m(X, torch.full((4,), 500), labels=torch.full_like(Y, 3))
    assert (e_c - e_u).abs().amax(dim=(0, 2, 3)).min() > 1e-3          # the label changes ε̂ in every channel: the test bites
    kw = dict(sampler=sampler, steps=6)
    c = Counting(m)
    got = sample(c, SCHED, X, labels=Y, guidance_scale=3.0, generator=torch.Generator().manual_seed(2), **kw)
    want = sample(_separate(m, 3.0), SCHED, X, labels=Y, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(c.calls) == n_model_calls(sampler, 6) and all(b == 8 for b, _ in c.calls)       # one call per step, both halves in it
    assert all(torch.equal(l, torch.tensor([0, 1, 2, 1, 3, 3, 3, 3])) for _, l in c.calls)      # conditional half, then ∅ = num_classes
    plain = sample(m, SCHED, X, labels=Y, generator=torch.Generator().manual_seed(2), **kw)
    assert (got - plain).abs().max() > 1e-3                                # guidance changed the samples


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_scale_one_is_the_conditional_model_and_zero_the_unconditional(sampler):
    m = _net()
    c = Counting(m)
    kw = dict(sampler=sampler, steps=5, generator=None)
    g = lambda: torch.Generator().manual_seed(3)
    cond = sample(m, SCHED, X, sampler=sampler, steps=5, labels=Y, generator=g())
    assert torch.equal(sample(c, SCHED, X, sampler=sampler, steps=5, labels=Y, guidance_scale=1, generator=g()), cond)
    assert all(b == 4 for b, _ in c.calls)                                    # w = 1 costs no extra model call
    unc = sample(m, SCHED, X, sampler=sampler, steps=5, labels=torch.full_like(Y, 3), generator=g())
    assert torch.equal(sample(m, SCHED, X, sampler=sampler, steps=5, labels=Y, guidance_scale=0, generator=g()), unc)
    assert (cond - unc).abs().max() > 1e-3


@pytest.mark.parametrize('sampler', ['ddpm', 'euler_a', 'ddim'])
def test_guided_sampling_is_deterministic_with_a_seed(sampler):
    m = _net()
    run = lambda s: sample(m, SCHED, X, sampler=sampler, steps=8, eta=0.5 if sampler == 'ddim' else 0.0, labels=Y,
                           guidance_scale=2.5, generator=torch.Generator().manual_seed(s))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


@pytest.mark.parametrize('sampler', ['ddim', 'heun', 'dpmpp_2m'])
def test_guidance_interval_guides_only_inside_the_sigma_range(sampler):
    "Calls at σ_t in (σ_lo, σ_hi] are guided (batch 2B), the others plain conditional (batch B); the whole range equals no interval."
    m = _net()
    ts = sampler_timesteps(1000, 10, 'leading', sampler)
    sig = sigmas_for(SCHED, ts)[:-1].tolist()
    lo, hi = sorted(sig)[3], sorted(sig)[7]                                  # a middle range of the visited levels
    c = Counting(m)
    sample(c, SCHED, X, sampler=sampler, steps=10, labels=Y, guidance_scale=4.0, guidance_interval=(lo, hi))
    if sampler != 'heun':
        want = [8 if lo < s <= hi else 4 for s in sig]
        assert [b for b, _ in c.calls] == want and 8 in want and 4 in want
    else: assert {b for b, _ in c.calls} == {4, 8}
    full = sample(m, SCHED, X, sampler=sampler, steps=10, labels=Y, guidance_scale=4.0)
    torch.testing.assert_close(sample(m, SCHED, X, sampler=sampler, steps=10, labels=Y, guidance_scale=4.0, guidance_interval=(0, math.inf)), full)
    empty = sample(m, SCHED, X, sampler=sampler, steps=10, labels=Y, guidance_scale=4.0, guidance_interval=(1e6, 1e7))
    assert torch.equal(empty, sample(m, SCHED, X, sampler=sampler, steps=10, labels=Y))


def test_drop_labels_rate_and_null_label():
    y = torch.arange(10).repeat(2000)
    d = drop_labels(y, 10, 0.1, torch.Generator().manual_seed(0))
    rate = (d == 10).float().mean().item()
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(y))
    assert torch.equal(d[d != 10], y[d != 10]) and set(d.unique().tolist()) <= set(range(11))
    assert torch.equal(drop_labels(y, 10, 0.0), y) and (drop_labels(y, 10, 1.0) == 10).all()
    assert (drop_labels(y, 12, 1.0) == 12).all()                               # the null label is num_classes, whatever it is


def test_cfgloss_drops_labels_only_in_training(monkeypatch):
    m = _net()
    seen = []
    orig = m.forward
    monkeypatch.setattr(m, 'forward', lambda x, t, labels=None: (seen.append(labels.clone()), orig(x, t, labels=labels))[1])
    x0, y = torch.randn(400, 2, 8, 8), torch.randint(0, 3, (400,))
    loss = CFGLoss(SCHED, p_uncond=0.5)
    torch.manual_seed(0); m.train(); l = loss(m, (x0, y))
    assert l.ndim == 0 and torch.isfinite(l)
    frac = (seen[-1] == 3).float().mean().item()
    assert 0.4 < frac < 0.6 and torch.equal(seen[-1][seen[-1] != 3], y[seen[-1] != 3])
    m.eval(); loss(m, (x0, y)); assert torch.equal(seen[-1], y)
    # with p_uncond = 0 it is DiffusionLoss(conditional=True), step for step
    m.train(); torch.manual_seed(5); a = CFGLoss(SCHED, p_uncond=0.0)(m, (x0[:8], y[:8]))
    torch.manual_seed(5); b = DiffusionLoss(SCHED, conditional=True)(m, (x0[:8], y[:8]))
    assert torch.equal(a, b)


def test_shipped_dit_samples_with_guidance():
    from diffcourse import pretrained
    dit = pretrained.load('fmnist-dit')
    y = torch.tensor([0, 5, 9])
    a = dit.sample(3, steps=4, labels=y, guidance_scale=2.0)
    b = dit.sample(3, steps=4, labels=y, guidance_scale=2.0)
    c = dit.sample(3, steps=4, labels=y)
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b) and (a - c).abs().max() > 1e-2
