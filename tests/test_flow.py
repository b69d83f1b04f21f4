"diffcourse.flow (chapter 14): conversions between targets, zero terminal SNR, the target losses, and the samplers against diffusers."
import math

import numpy as np
import pytest
import torch

from diffcourse.flow import (TARGETS, split_prediction, make_target, convert_prediction, implied_weight, zero_terminal_snr,
                             TargetLoss, ddim_sample_target, flow_timesteps, flow_sample, AsEps, straightness)
from diffcourse.schedules import NoiseSchedule
from diffcourse.ddpm import MLPDenoiser, sliced_wasserstein
from diffcourse.data import toy_points, get_dataloader
from diffcourse.learner import Learner, CosineCB, MetricsCB
from diffcourse.unet import ResUNet
from diffcourse import samplers


def _pairs(dtype=torch.float64, n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = NoiseSchedule.cosine(1000)
    ab = sched.alphas_cumprod[:, None].double()
    x0, eps = torch.randn(n, 8, generator=g, dtype=dtype), torch.randn(n, 8, generator=g, dtype=dtype)
    a, b = ab.sqrt().to(dtype)[:n], (1 - ab).sqrt().to(dtype)[:n]
    return x0, eps, a, b, a * x0 + b * eps


@pytest.mark.parametrize('src', ('eps', 'x0', 'v'))
@pytest.mark.parametrize('dst', ('eps', 'x0', 'v'))
def test_vp_conversions_are_exact(src, dst):
    x0, eps, a, b, x_t = _pairs()
    got = convert_prediction(make_target(eps, x0, a, b, src), x_t, a, b, src, dst)
    torch.testing.assert_close(got, make_target(eps, x0, a, b, dst), atol=1e-9, rtol=0)


def test_v_and_flow_closed_forms():
    x0, eps, a, b, x_t = _pairs()
    v = make_target(eps, x0, a, b, 'v')
    torch.testing.assert_close(v, a * eps - b * x0)
    torch.testing.assert_close(split_prediction(v, x_t, a, b, 'v')[1], a * x_t - b * v)      # x̂0 = a x_t - b v, no division
    s = torch.rand(len(x0), 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_s = (1 - s) * x0 + s * eps
    u = make_target(eps, x0, 1 - s, s, 'flow')
    torch.testing.assert_close(u, eps - x0)
    e, x = split_prediction(u, x_s, 1 - s, s, 'flow')
    torch.testing.assert_close(e, eps); torch.testing.assert_close(x, x0)
    # the flow velocity from a v-prediction at the same signal-to-noise ratio: u = (ε - x0) on the rescaled point
    torch.testing.assert_close(convert_prediction(v, x_t, a, b, 'v', 'flow'), eps - x0)


def test_diffusers_get_velocity_matches():
    from diffusers import DDPMScheduler
    sched = NoiseSchedule.linear(1000)
    d = DDPMScheduler(num_train_timesteps=1000, trained_betas=sched.betas.numpy())
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(16, 3, 4, 4, generator=g), torch.randn(16, 3, 4, 4, generator=g), torch.randint(0, 1000, (16,), generator=g)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(make_target(eps, x0, ab.sqrt(), (1 - ab).sqrt(), 'v'), d.get_velocity(x0, eps, t), atol=1e-6, rtol=0)


def test_implied_weights_match_the_conversions():
    "An error δ in ε̂ is an error sqrt(w(λ))·δ in each target: the weight is the squared ratio of the errors."
    x0, eps, a, b, x_t = _pairs(n=900)
    delta = 1e-3 * torch.randn_like(eps)
    lam = torch.log(a ** 2 / b ** 2)[:, 0]
    for tgt in ('x0', 'v'):
        err = convert_prediction(eps + delta, x_t, a, b, 'eps', tgt) - make_target(eps, x0, a, b, tgt)
        torch.testing.assert_close((err ** 2).sum(1) / (delta ** 2).sum(1), implied_weight(lam, tgt), rtol=1e-6, atol=0)
    s = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)[:, None]
    x_s = (1 - s) * x0[:50] + s * eps[:50]
    err = convert_prediction(eps[:50] + delta[:50], x_s, 1 - s, s, 'eps', 'flow') - (eps[:50] - x0[:50])
    lam_s = 2 * torch.log((1 - s) / s)[:, 0]
    torch.testing.assert_close((err ** 2).sum(1) / (delta[:50] ** 2).sum(1), implied_weight(lam_s, 'flow'), rtol=1e-6, atol=0)
    assert torch.equal(implied_weight(torch.tensor([-3., 0., 3.]), 'eps'), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize('name', ['linear', 'cosine', 'sd'])
def test_zero_terminal_snr_matches_diffusers(name):
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    sc = NoiseSchedule(torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2) if name == 'sd' else getattr(NoiseSchedule, name)(1000)
    z = zero_terminal_snr(sc)
    torch.testing.assert_close(z.betas.double(), rescale_zero_terminal_snr(sc.betas.double()), atol=1e-7, rtol=0)
    assert z.alphas_cumprod[-1] == 0 and z.betas[-1] == 1 and z.T == sc.T
    torch.testing.assert_close(z.alphas_cumprod[0], sc.alphas_cumprod[0])
    assert (z.alphas_cumprod[1:] < z.alphas_cumprod[:-1]).all()          # still decreasing
    x0 = torch.randn(4, 2)
    torch.testing.assert_close(z.add_noise(x0, torch.ones_like(x0), torch.full((4,), 999)), torch.ones_like(x0))   # pure noise at the end


class _Lin(torch.nn.Module):
    "A fixed smooth function of (x, t), standing in for a trained model."
    def __init__(self, dim=2, seed=0):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) * 0.3)
    def forward(self, x, t, **kw):
        return torch.tanh(x @ self.W) * (1 + t.float()[:, None] / 1000)


def _diffusers_ddim(model, betas, x, prediction_type, zero, steps, spacing, eta=0.0, generator=None, clip=None):
    from diffusers import DDIMScheduler
    d = DDIMScheduler(num_train_timesteps=1000, trained_betas=betas.numpy(), prediction_type=prediction_type, rescale_betas_zero_snr=zero,
                      timestep_spacing=spacing, clip_sample=clip is not None, clip_sample_range=clip or 1.0, set_alpha_to_one=True)
    d.set_timesteps(steps)
    y = x.clone()
    for t in d.timesteps: y = d.step(model(y, t.expand(len(y))), t, y, eta=eta, generator=generator).prev_sample
    return y


@pytest.mark.parametrize('target,ptype', [('eps', 'epsilon'), ('x0', 'sample'), ('v', 'v_prediction')])
@pytest.mark.parametrize('zero', [False, True])
@pytest.mark.parametrize('spacing', ['leading', 'trailing'])
def test_ddim_sample_target_matches_diffusers(target, ptype, zero, spacing):
    if zero and target == 'eps' and spacing == 'trailing': return          # refused: see test_bad_inputs
    sched = NoiseSchedule.linear(1000)
    model, x = _Lin(), torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    ours = ddim_sample_target(model, zero_terminal_snr(sched) if zero else sched, x, target=target, steps=20, spacing=spacing)
    ref = _diffusers_ddim(model, sched.betas, x, ptype, zero, 20, spacing)
    torch.testing.assert_close(ours, ref, atol=2e-5 * max(1.0, ref.abs().max().item()), rtol=0)


def test_ddim_sample_target_eta_and_clip_match_diffusers():
    sched = NoiseSchedule.linear(1000)
    model, x = _Lin(), torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    # diffusers draws DDIM's noise with randn_tensor(shape, generator) each step, as ours does with the same generator
    ours = ddim_sample_target(model, sched, x, target='v', steps=10, spacing='trailing', eta=1.0, generator=torch.Generator().manual_seed(7), clip_sample=1.0)
    ref = _diffusers_ddim(model, sched.betas, x, 'v_prediction', False, 10, 'trailing', eta=1.0, generator=torch.Generator().manual_seed(7), clip=1.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_eps_target_equals_the_course_sampler():
    "With target='eps', ddim_sample_target is chapter 09's DDIM."
    sched = NoiseSchedule.cosine(1000)
    model, x = _Lin(), torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim_sample_target(model, sched, x, target='eps', steps=25, spacing='leading'),
                               samplers.sample(model, sched, x, sampler='ddim', steps=25, spacing='leading'), atol=1e-5, rtol=0)


@pytest.mark.parametrize('shift', [1.0, 3.0])
@pytest.mark.parametrize('steps', [1, 4, 10])
def test_flow_samplers_match_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
    model, x = _Lin(), torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    for cls, name in [(FlowMatchEulerDiscreteScheduler, 'euler'), (FlowMatchHeunDiscreteScheduler, 'heun')]:
        d = cls(num_train_timesteps=1000, shift=shift); d.set_timesteps(steps)
        y, calls = x.clone(), 0
        for t in d.timesteps: y = d.step(model(y, t.expand(16)), t, y).prev_sample; calls += 1
        n = []
        ours = flow_sample(lambda xx, tt: (n.append(1), model(xx, tt))[1], x, steps=steps, shift=shift, sampler=name)
        torch.testing.assert_close(ours, y, atol=2e-5, rtol=0)
        assert len(n) == calls == (steps if name == 'euler' else 2 * steps - 1)
    torch.testing.assert_close(flow_timesteps(steps, shift)[:-1] * 1000, _timesteps(steps, shift), atol=1e-3, rtol=0)


def _timesteps(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    d = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift); d.set_timesteps(steps)
    return d.timesteps


def test_flow_timesteps_shape():
    s = flow_timesteps(10)
    assert len(s) == 11 and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert (flow_timesteps(10, shift=3.0)[1:-1] > s[1:-1]).all()          # a shift above 1 keeps more steps at high noise


def test_as_eps_flow_model_is_exact_on_exact_velocity():
    "For data N(μ, I·c²) the exact ε and u are known in closed form: AsEps of the exact velocity gives the exact ε at every t."
    mu, c = torch.tensor([2.0, -1.0]), 0.5
    sched = NoiseSchedule.cosine(1000)
    def u_exact(x_s, tt):          # x_s = (1-s) x0 + s ε with x0 ~ N(μ, c²): E[ε - x0 | x_s]
        s = (tt / 1000).reshape(-1, 1).double(); xs = x_s.double()
        var = (1 - s) ** 2 * c ** 2 + s ** 2
        e_eps = s * (xs - (1 - s) * mu) / var
        e_x0 = mu + (1 - s) * c ** 2 * (xs - (1 - s) * mu) / var
        return (e_eps - e_x0).float()
    def eps_exact(x_t, t):
        ab = sched.alphas_cumprod.double()[t].reshape(-1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return (b * (x_t.double() - a * mu) / (a ** 2 * c ** 2 + b ** 2)).float()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(AsEps(_Wrap(u_exact), 'flow', sched)(x, t), eps_exact(x, t), atol=1e-4, rtol=1e-4)


class _Wrap(torch.nn.Module):
    def __init__(self, f): super().__init__(); self.f = f
    def forward(self, x, t, **kw): return self.f(x, t)


def test_as_eps_runs_every_sampler_and_agrees_with_ddim_sample_target():
    sched = NoiseSchedule.linear(1000)
    model, x = _Lin(), torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    for tgt in ('x0', 'v'):
        torch.testing.assert_close(samplers.sample(AsEps(model, tgt, sched), sched, x, sampler='ddim', steps=20, spacing='leading'),
                                   ddim_sample_target(model, sched, x, target=tgt, steps=20, spacing='leading'), atol=1e-4, rtol=1e-4)
    for sampler in samplers.SAMPLERS:
        out = samplers.sample(AsEps(model, 'flow', sched), sched, x, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_as_eps_keeps_conditioning_and_guidance():
    sched = NoiseSchedule.cosine(1000)
    net = ResUNet(in_channels=1, channels=(16, 32), attention=(False, False), num_classes=3)
    m = AsEps(net, 'flow', sched).eval()
    assert m.num_classes == 3 and m.in_channels == 1
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = samplers.sample(m, sched, x, sampler='ddim', steps=3, labels=torch.tensor([0, 2]), guidance_scale=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize('target', TARGETS)
def test_target_loss_is_the_mse_to_the_target(target):
    sched = NoiseSchedule.cosine(1000)
    seen = {}
    class Spy(torch.nn.Module):
        def __init__(self): super().__init__(); self.p = torch.nn.Parameter(torch.zeros(()))
        def forward(self, x, t, **kw): seen.update(x=x, t=t, kw=kw); return torch.zeros_like(x) + self.p
    x0 = torch.randn(256, 2)
    torch.manual_seed(0)
    loss = TargetLoss(target, sched if target != 'flow' else None)(Spy(), x0)
    torch.manual_seed(0)                                  # replay the same draws: ε first, then t or s
    eps = torch.randn_like(x0)
    if target == 'flow':
        s = torch.rand(256)
        assert torch.allclose(seen['t'], s * 1000) and seen['t'].is_floating_point()
        a, b = (1 - s)[:, None], s[:, None]
    else:
        t = torch.randint(0, 1000, (256,))
        assert torch.equal(seen['t'], t)
        ab = sched.alphas_cumprod[t][:, None]; a, b = ab.sqrt(), (1 - ab).sqrt()
    torch.testing.assert_close(seen['x'], a * x0 + b * eps)
    torch.testing.assert_close(loss, (make_target(eps, x0, a, b, target) ** 2).mean())


def test_target_loss_passes_labels():
    seen = {}
    m = lambda x, t, **kw: (seen.update(kw), torch.zeros_like(x))[1]
    TargetLoss('flow', conditional=True)(m, (torch.randn(4, 2), torch.tensor([0, 1, 2, 3])))
    assert torch.equal(seen['labels'], torch.tensor([0, 1, 2, 3]))


def test_flow_matching_learns_the_two_moons():
    "A flow-matching MLP trained briefly samples points close to the data: chapter 03's test of its ε-model."
    torch.manual_seed(0)
    pts = toy_points('moons', n=1000, seed=0)
    m = MLPDenoiser(dim=2, hidden=64, n_layers=2)
    Learner(m, get_dataloader(pts, batch_size=256, seed=0), TargetLoss('flow'), lr=3e-3, cbs=[CosineCB(warmup=0.05), MetricsCB(printer=None)]).fit(steps=600)
    m.eval()
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    s = flow_sample(m, x, steps=20)
    ref = toy_points('moons', n=1000, seed=2)
    assert sliced_wasserstein(s, ref) < 0.5 * sliced_wasserstein(x, ref)


def test_v_model_on_zero_snr_samples_from_pure_noise_where_eps_cannot():
    sched = zero_terminal_snr(NoiseSchedule.linear(1000))
    torch.manual_seed(0)
    pts = toy_points('moons', n=1000, seed=0)
    m = MLPDenoiser(dim=2, hidden=64, n_layers=2)
    Learner(m, get_dataloader(pts, batch_size=256, seed=0), TargetLoss('v', sched), lr=3e-3, cbs=[CosineCB(warmup=0.05), MetricsCB(printer=None)]).fit(steps=600)
    m.eval()
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    s = ddim_sample_target(m, sched, x, target='v', steps=20, spacing='trailing')      # starts at t = 999, where ᾱ = 0
    ref = toy_points('moons', n=1000, seed=2)
    assert torch.isfinite(s).all() and sliced_wasserstein(s, ref) < 0.5 * sliced_wasserstein(x, ref)


def test_straightness():
    line = torch.linspace(0, 1, 6)[:, None, None] * torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(straightness(line), torch.ones(1))
    corner = torch.tensor([[[0., 0.]], [[1., 0.]], [[1., 1.]]])
    torch.testing.assert_close(straightness(corner), torch.tensor([math.sqrt(2) / 2]))


def test_bad_inputs():
    sched, model, x = NoiseSchedule.linear(1000), _Lin(), torch.randn(4, 2)
    with pytest.raises(ValueError, match="target must be one of 'eps', 'x0', 'v', 'flow'; got 'score'"): TargetLoss('score', sched)
    with pytest.raises(TypeError, match="target 'v' needs schedule="): TargetLoss('v')
    with pytest.raises(ValueError, match="target 'eps' cannot be learned where ᾱ = 0"): TargetLoss('eps', zero_terminal_snr(sched))
    with pytest.raises(ValueError, match="TargetLoss\\(conditional=True\\) needs batches"): TargetLoss('flow', conditional=True)(model, torch.randn(4, 2))
    with pytest.raises(ValueError, match="an ε-model cannot start at t=999, where ᾱ = 0"):
        ddim_sample_target(model, zero_terminal_snr(sched), x, target='eps', steps=10, spacing='trailing')
    with pytest.raises(ValueError, match="target must be one of 'eps', 'x0', 'v'; got 'flow'"): ddim_sample_target(model, sched, x, target='flow')
    with pytest.raises(ValueError, match="steps must be an int from 1 to 1000; got 0"): ddim_sample_target(model, sched, x, steps=0)
    with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\]"): ddim_sample_target(model, sched, x, eta=2)
    with pytest.raises(ValueError, match="sampler must be one of 'euler', 'heun'; got 'rk4'"): flow_sample(model, x, sampler='rk4')
    with pytest.raises(ValueError, match="shift must be a positive number"): flow_timesteps(10, shift=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"): flow_sample(model, [1.0, 2.0])
    with pytest.raises(ValueError, match="model must return a prediction of the input's shape \\(4, 2\\)"): flow_sample(lambda x, t: x[:, :1], x)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"): zero_terminal_snr('linear')
    with pytest.raises(ValueError, match="trajectory must be a tensor \\(K, B, ...\\)"): straightness(torch.zeros(1, 3, 2))
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"): AsEps(model, 'v', None)
