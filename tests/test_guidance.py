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
from diffcourse.guidance import drop_labels, CFGLoss, MixtureEps
import numpy as np
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


# ---------------------------------------------------------------- MixtureEps: exact scores of a Gaussian mixture

def _mixture():
    means = torch.tensor([[-1.0, 0.0], [-0.3, 0.8], [1.0, 0.0], [0.3, 0.8], [0.0, -0.5], [0.0, -1.3]])
    return MixtureEps(SCHED, means, 0.4, [0, 0, 1, 1, 2, 2], weights=[1, 2, 1, 1, 3, 1]), means


def _logp(means, t, keep, weights):
    ab = SCHED.alphas_cumprod[t].double()
    comp = torch.distributions.Independent(torch.distributions.Normal(ab.sqrt() * means[keep].double(), (ab * 0.16 + 1 - ab).sqrt().expand(int(keep.sum()), 2)), 1)
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(weights[keep]), comp)


@pytest.mark.parametrize('t', [0, 50, 400, 900, 999])
def test_mixture_eps_is_the_scaled_score_of_the_noisy_mixture(t):
    mix, means = _mixture()
    w = torch.tensor([1, 2, 1, 1, 3, 1], dtype=torch.float64)
    cls = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(t), requires_grad=True)
    for label in (0, 1, 2, 3):
        keep = torch.ones(6, dtype=torch.bool) if label == 3 else cls == label
        grad, = torch.autograd.grad(_logp(means, t, keep, w).log_prob(x).sum(), x)
        eps = mix(x.detach(), torch.full((6,), t), labels=torch.full((6,), label))
        torch.testing.assert_close(eps, -(1 - SCHED.alphas_cumprod[t].double()).sqrt() * grad, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(mix(x.detach(), torch.full((6,), t)), mix(x.detach(), torch.full((6,), t), labels=torch.full((6,), 3)))


def test_mixture_eps_interpolates_fractional_timesteps():
    mix, _ = _mixture()
    x = torch.randn(3, 2, dtype=torch.float64)
    a, b = mix(x, torch.full((3,), 400)), mix(x, torch.full((3,), 401))
    mid = mix(x, torch.full((3,), 400.5))
    assert (mid - a).abs().max() > 0 and (mid - b).abs().max() > 0 and ((mid - a).abs() <= (b - a).abs() + 1e-12).all()


def test_guidance_on_exact_scores_raises_accuracy_and_w1_samples_the_class():
    "With exact scores, w = 1 draws the class distribution and larger w puts more points where their class is most probable."
    mix, means = _mixture()
    n = 400
    y = torch.arange(3).repeat_interleave(n)
    xT = torch.randn(3 * n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cls = torch.tensor([0, 0, 1, 1, 2, 2]); w_ = torch.tensor([1, 2, 1, 1, 3, 1], dtype=torch.float64)
    def acc(p):
        lp = torch.stack([_logp(means, 0, cls == c, w_).log_prob(p) for c in range(3)], 1)
        return (lp.argmax(1) == y).double().mean().item()
    res = {w: acc(sample(mix, SCHED, xT, sampler='ddim', steps=50, labels=y, guidance_scale=w)) for w in (0, 1, 2)}
    means_w1 = sample(mix, SCHED, xT, sampler='ddim', steps=50, labels=y, guidance_scale=1)
    for c in range(3):     # the class mean of the samples is the mixture's class mean (weights within the class)
        m = (w_[cls == c, None] * means[cls == c].double()).sum(0) / w_[cls == c].sum()
        assert (means_w1[y == c].mean(0) - m).norm() < 0.08
    assert res[0] < 0.5 < res[1] < res[2]


def test_mixture_eps_bad_input():
    with pytest.raises(ValueError, match=r"means must be \(K, D\)"): MixtureEps(SCHED, torch.zeros(3), 0.3, [0, 1, 2])
    with pytest.raises(ValueError, match="positive stds and weights"): MixtureEps(SCHED, torch.zeros(3, 2), -1.0, [0, 1, 2])
    with pytest.raises(ValueError, match="K class labels"): MixtureEps(SCHED, torch.zeros(3, 2), 0.3, [0, 1])
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"): MixtureEps('cosine', torch.zeros(3, 2), 0.3, [0, 1, 2])


# ---------------------------------------------------------------- the sweep and the explorer

class _FakePre:
    "A stand-in for a Pretrained class-conditional model: `sample` returns images that the classifier's stub reads as the label with a probability rising in w."
    def __init__(self):
        self.model = nn.Module(); self.model.num_classes = 10; self.calls = []
        self.card = {'data': {'classes': [f'c{i}' for i in range(10)]}}
    def sample(self, n, seed=0, labels=None, guidance_scale=None, **kw):
        self.calls.append(dict(n=n, seed=seed, w=guidance_scale, **kw))
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1


def test_guidance_sweep_runs_every_scale_interval_and_seed(monkeypatch):
    import diffcourse.guidance as G
    monkeypatch.setattr(G, 'features', lambda x: x.reshape(len(x), -1)[:, :8].double())
    monkeypatch.setattr(G, 'class_accuracy', lambda x, y: (y == 0).double().mean().item())   # a classifier stub that always says class 0
    pre = _FakePre()
    ref = (torch.rand(400, 1, 28, 28) * 2 - 1, torch.arange(400) % 10)
    rows = G.guidance_sweep(pre, [1, 3], ref, n=200, seeds=(0, 1), intervals=(None, (0.5, 2.0)), keep=4, progress=False, steps=7)
    assert len(rows) == 8 and len(pre.calls) == 8
    assert [(r['scale'], r['interval'], r['seed']) for r in rows][:4] == [(1, None, 0), (1, None, 1), (1, (0.5, 2.0), 0), (1, (0.5, 2.0), 1)]
    assert all(c['steps'] == 7 for c in pre.calls) and pre.calls[2]['guidance_interval'] == (0.5, 2.0) and 'guidance_interval' not in pre.calls[0]
    r = rows[0]
    assert r['n'] == 200 and r['samples'].shape == (4, 1, 28, 28) and len(r['class_fid']) == len(r['class_kid']) == 10
    assert r['class_accuracy'] == pytest.approx(0.1)                 # a tenth of the asked-for labels are 0
    assert r['fid'] >= 0 and r['seconds_per_sample'] > 0
    tab = G.sweep_table(rows, 'class_accuracy')
    assert set(tab) == {(1, None), (1, (0.5, 2.0)), (3, None), (3, (0.5, 2.0))} and tab[1, None][0] == pytest.approx(0.1)
    f = G.sweep_table(rows, 'fid')[1, None]
    assert f[0] == pytest.approx(np.mean([rows[0]['fid'], rows[1]['fid']])) and f[1] == pytest.approx(np.std([rows[0]['fid'], rows[1]['fid']], ddof=1))


def test_guidance_sweep_and_explorer_refuse_unconditional_models():
    import diffcourse.guidance as G
    pre = _FakePre(); pre.model.num_classes = None
    ref = (torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance_sweep needs a class-conditional model"): G.guidance_sweep(pre, [1], ref, progress=False)
    with pytest.raises(ValueError, match="guidance_explorer needs a class-conditional model"): G.guidance_explorer(pre)
    pre.model.num_classes = 10
    with pytest.raises(ValueError, match="n must be an int of at least 2·num_classes = 20"): G.guidance_sweep(pre, [1], ref, n=10, progress=False)
    with pytest.raises(ValueError, match=r"reference must be \(images, labels\)"): G.guidance_sweep(pre, [1], ref[0], progress=False)


def test_guidance_explorer_draws_and_redraws(monkeypatch):
    import matplotlib; matplotlib.use('Agg')
    import diffcourse.guidance as G
    pre = _FakePre()
    panel = G.guidance_explorer(pre, n=3)
    assert len(pre.calls) == 1 and pre.calls[0]['w'] == 2.0 and pre.calls[0]['sampler'] == 'dpmpp_2m'
    cls_menu, scale = panel.children[0].children
    scale.value = 5.0; cls_menu.value = 4
    assert len(pre.calls) == 3 and pre.calls[-1]['w'] == 5.0


def test_shipped_cfg_model_follows_its_label_more_with_guidance():
    "fmnist-cfg, 100 samples at 10 steps: unconditional (w = 0) ignores the label, w = 3 shows it in nearly every sample (measured 0.98 for seeds 0 and 1)."
    from diffcourse import pretrained
    from diffcourse.metrics import class_accuracy
    cfg = pretrained.load('fmnist-cfg')
    assert cfg.model.num_classes == 10 and cfg.card['training']['class_dropout'] == 0.1
    y = torch.arange(100) % 10
    acc = {w: class_accuracy(cfg.sample(100, labels=y, guidance_scale=w, steps=10, seed=0), y) for w in (0, 1, 3)}
    assert acc[0] < 0.3 < acc[1] < acc[3] and acc[3] >= 0.9
    a = cfg.sample(4, labels=y[:4], guidance_scale=3, steps=5, seed=7)
    assert torch.equal(a, cfg.sample(4, labels=y[:4], guidance_scale=3, steps=5, seed=7))
