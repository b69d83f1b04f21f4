"""diffcourse.ddpm: the ancestral step and sampler against diffusers' DDPMScheduler, shape-agnostic sampling,
determinism, the loss against a hand computation, the distances, and bad inputs."""
import math

import pytest
import torch
from torch import nn

from diffcourse.schedules import NoiseSchedule
from diffcourse.ddpm import (timestep_embedding, MLPDenoiser, ddpm_loss, DiffusionLoss, train_points, ddpm_update,
                             ddpm_step, ddpm_sample, predicted_mean, sliced_wasserstein, mmd, DDPMStepOutput)

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler


def dummy_model(schedule):
    "A deterministic stand-in ε-predictor for tensors of any shape: a fixed non-linear function of x_t and t."
    ac = schedule.alphas_cumprod
    def f(x, t, **kw):
        s = (1 - ac[t.cpu()]).sqrt().reshape(-1, *([1] * (x.ndim - 1))).to(x)
        return x * s + 0.1 * torch.sin(3 * x)
    return f


def schedules():
    return [("linear", NoiseSchedule.linear(1000), dict(beta_schedule="linear")),
            ("linear100", NoiseSchedule.linear(100, 1e-3, 0.2), dict(beta_schedule="linear", beta_start=1e-3, beta_end=0.2)),
            ("cosine", NoiseSchedule.cosine(1000), dict(beta_schedule="squaredcos_cap_v2"))]


def ref_loop(ref, model, x, generator, steps=None):
    ref.set_timesteps(steps or ref.config.num_train_timesteps)
    for t in ref.timesteps:
        x = ref.step(model(x, t.expand(len(x))), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("variance,vtype", [("beta", "fixed_large"), ("posterior", "fixed_small")])
@pytest.mark.parametrize("name,sched,kw", schedules(), ids=[s[0] for s in schedules()])
def test_sampler_matches_diffusers(variance, vtype, name, sched, kw):
    T = sched.T
    model = dummy_model(sched)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = ddpm_sample(model, sched, x, generator=torch.Generator().manual_seed(2), variance=variance)
    # with diffusers' own float32 ᾱ: agreement to float32 rounding of ᾱ, carried through T steps
    ref = DDPMScheduler(num_train_timesteps=T, variance_type=vtype, clip_sample=False, prediction_type="epsilon", **kw)
    theirs = ref_loop(ref, model, x, torch.Generator().manual_seed(2))
    assert (ours - theirs).abs().max() < 5e-4 * theirs.abs().max()
    # with our ᾱ handed to diffusers, the loops are the same arithmetic
    ref = DDPMScheduler(num_train_timesteps=T, variance_type=vtype, clip_sample=False, prediction_type="epsilon", **kw)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    theirs = ref_loop(ref, model, x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variance,vtype", [("beta", "fixed_large"), ("posterior", "fixed_small")])
def test_step_matches_diffusers_with_given_noise_and_strided(variance, vtype):
    "One step at a time with the same noise, including strided timesteps (prev_t) and clipping."
    sched = NoiseSchedule.linear(1000)
    model = dummy_model(sched)
    ref = DDPMScheduler(num_train_timesteps=1000, variance_type=vtype, clip_sample=True, clip_sample_range=1.0)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    ref.set_timesteps(50)   # 'leading' spacing: 980, 960, ..., 0
    ts = ref.timesteps.tolist()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = model(x, torch.full((16,), t))
        g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        out_ref = ref.step(eps, t, x, generator=g1)
        ours = ddpm_update(sched, eps, x, t, generator=g2, variance=variance, prev_t=prev, clip_sample=1.0)
        torch.testing.assert_close(ours.prev_sample, out_ref.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.pred_original_sample, out_ref.pred_original_sample, rtol=1e-6, atol=1e-6)
        x = out_ref.prev_sample


def test_step_given_noise_and_closed_form():
    sched = NoiseSchedule.linear(100, 1e-3, 0.2)
    x, eps, z = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 3)
    t = 40
    b, a, ab = sched.betas[t].double(), sched.alphas[t].double(), sched.alphas_cumprod.double()
    mean = (x.double() - b / (1 - ab[t]).sqrt() * eps.double()) / a.sqrt()
    out = ddpm_update(sched, eps, x, t, noise=z, variance="beta")
    assert isinstance(out, DDPMStepOutput)
    torch.testing.assert_close(out.prev_sample.double(), mean + b.sqrt() * z.double(), rtol=1e-4, atol=1e-5)
    post = (1 - ab[t - 1]) / (1 - ab[t]) * b
    out = ddpm_update(sched, eps, x, t, noise=z, variance="posterior")
    torch.testing.assert_close(out.prev_sample.double(), mean + post.sqrt() * z.double(), rtol=1e-4, atol=1e-5)
    # no noise at the last step
    out0 = ddpm_update(sched, eps, x, 0, noise=z)
    torch.testing.assert_close(out0.prev_sample, out0.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_per_example_timesteps_match_scalar_steps():
    sched = NoiseSchedule.cosine(50)
    model = dummy_model(sched)
    x, z = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([0, 7, 49])
    both = ddpm_step(model, sched, x, t, noise=z).prev_sample
    for i in range(3):
        one = ddpm_step(model, sched, x[i:i + 1], int(t[i]), noise=z[i:i + 1]).prev_sample
        torch.testing.assert_close(both[i:i + 1], one)


@pytest.mark.parametrize("shape", [(32, 2), (4, 1, 8, 8), (3, 3, 4, 5)])
def test_sampling_any_shape_and_determinism(shape):
    sched = NoiseSchedule.linear(30, 1e-3, 0.5)
    model = dummy_model(sched)
    x = torch.randn(*shape)
    a = ddpm_sample(model, sched, x, generator=torch.Generator().manual_seed(0))
    b = ddpm_sample(model, sched, x, generator=torch.Generator().manual_seed(0))
    c = ddpm_sample(model, sched, x, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    out = ddpm_sample(model, sched, x, generator=torch.Generator().manual_seed(0), return_trajectory=True, keep_every=10)
    assert torch.equal(out.sample, a)
    assert out.timesteps.tolist() == [29, 19, 9, -1]   # the start (seen at t = T-1), then x after the steps t = 20, 10, 0
    assert out.trajectory.shape == (4, *shape) and torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], a)
    assert torch.isnan(out.pred_original_samples[0]).all() and torch.equal(out.pred_original_samples[-1], a)


def test_sampler_passes_model_kwargs_and_uses_global_rng():
    sched = NoiseSchedule.linear(10, 1e-3, 0.5)
    seen = []
    def model(x, t, labels=None):
        seen.append(labels); return torch.zeros_like(x)
    x = torch.randn(4, 2)
    torch.manual_seed(5); a = ddpm_sample(model, sched, x, labels=torch.arange(4))
    torch.manual_seed(5); b = ddpm_sample(model, sched, x, labels=torch.arange(4))
    assert torch.equal(a, b) and len(seen) == 20 and all(torch.equal(s, torch.arange(4)) for s in seen)


def test_loss_by_hand_and_defaults():
    sched = NoiseSchedule.linear(100, 1e-3, 0.2)
    torch.manual_seed(0)
    model = MLPDenoiser(dim=2, hidden=16, n_layers=2)
    nn.init.normal_(model.out[1].weight)   # make the prediction non-zero
    x0, t, eps = torch.randn(10, 2), torch.randint(0, 100, (10,)), torch.randn(10, 2)
    ab = sched.alphas_cumprod[t][:, None]
    with torch.no_grad():
        by_hand = ((model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t) - eps) ** 2).mean()
        assert torch.allclose(ddpm_loss(model, sched, x0, t, eps), by_hand, atol=1e-6)
        # t and noise default to draws from the global RNG: same seed, same loss
        torch.manual_seed(1); l1 = ddpm_loss(model, sched, x0)
        torch.manual_seed(1); l2 = ddpm_loss(model, sched, x0)
        assert l1 == l2 and l1.ndim == 0
    # images: any shape
    img_model = lambda x, t: torch.zeros_like(x)
    x0 = torch.randn(4, 1, 8, 8); eps = torch.randn_like(x0)
    assert torch.allclose(ddpm_loss(img_model, sched, x0, torch.tensor([0, 1, 2, 3]), eps), (eps ** 2).mean())


def test_diffusion_loss_batches_and_labels():
    sched = NoiseSchedule.linear(20, 1e-3, 0.5)
    got = {}
    def model(x, t, labels=None):
        got['labels'] = labels; return torch.zeros_like(x)
    x0, y = torch.randn(6, 2), torch.arange(6)
    torch.manual_seed(0); a = DiffusionLoss(sched)(model, x0)
    torch.manual_seed(0); b = DiffusionLoss(sched)(model, (x0, y))
    assert a == b and got['labels'] is None
    DiffusionLoss(sched, conditional=True)(model, [x0, y])
    assert torch.equal(got['labels'], y)
    with pytest.raises(ValueError, match="needs batches"): DiffusionLoss(sched, conditional=True)(model, x0)
    with pytest.raises(TypeError, match="batch must be a tensor"): DiffusionLoss(sched)(model, {'x': x0})
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"): DiffusionLoss("linear")


def test_timestep_embedding():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 5, 50, 999])
    for dim in (16, 33):
        e = timestep_embedding(t, dim)
        assert e.shape == (5, dim)
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(e, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="t must be a 1-D tensor"): timestep_embedding(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="dim must be a positive int"): timestep_embedding(t, 0)


def test_train_points_learns_and_repeats():
    sched = NoiseSchedule.linear(50, 1e-3, 0.3)
    pts = torch.randn(500, 2) * 0.1 + torch.tensor([1.0, -1.0])
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = MLPDenoiser(dim=2, hidden=32, n_layers=2)
        runs.append(train_points(m, pts, sched, steps=150, batch_size=64, seed=3, progress=False))
    assert runs[0] == runs[1]
    assert sum(runs[0][-20:]) / 20 < 0.7 * sum(runs[0][:20]) / 20
    s = ddpm_sample(m, sched, torch.randn(500, 2, generator=torch.Generator().manual_seed(0)), generator=torch.Generator().manual_seed(1))
    assert sliced_wasserstein(s, pts) < 0.5 * sliced_wasserstein(torch.randn(500, 2), pts)
    drift = predicted_mean(m, sched, torch.tensor([[4.0, 4.0]]), 10) - torch.tensor([[4.0, 4.0]])
    assert (drift < 0).all()   # far from the data, the drift points back to it


def test_distances():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 2, generator=g), torch.randn(1000, 2, generator=g)
    shifted = a + torch.tensor([1.0, 0.0])
    assert sliced_wasserstein(a, a) == 0 and sliced_wasserstein(a, b) < 0.1
    # a shift by v has sliced W2 = |v| sqrt(E[(u·e1)²]) = |v|/sqrt(2) in 2-D
    assert abs(sliced_wasserstein(a, shifted, n_projections=2000) - 1 / math.sqrt(2)) < 0.03
    assert sliced_wasserstein(a, b, seed=1) == sliced_wasserstein(a, b, seed=1)
    assert mmd(a, a) < 1e-6 and mmd(a, b) < 0.01 < mmd(a, shifted)
    assert mmd(a, b, max_points=500) == mmd(a, b, max_points=500)
    with pytest.raises(ValueError, match="same dimension"): sliced_wasserstein(a, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"a must be a point set \(N, dim\)"): sliced_wasserstein(torch.randn(5), a)
    with pytest.raises(ValueError, match="same dimension"): mmd(a, torch.randn(5, 3))


def test_bad_inputs():
    sched = NoiseSchedule.linear(10, 1e-3, 0.5)
    model = dummy_model(sched)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="variance must be one of"): ddpm_sample(model, sched, x, variance="large")
    with pytest.raises(ValueError, match="variance must be one of"): ddpm_step(model, sched, x, 3, variance="fixed_small")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"): ddpm_step(model, sched, x, 10)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"): ddpm_step(model, sched, x, -1)
    with pytest.raises(TypeError, match="t must hold integer timesteps"): ddpm_step(model, sched, x, 2.5)
    with pytest.raises(ValueError, match="t must be an int or a \\(B,\\) tensor"): ddpm_step(model, sched, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prev_t must be earlier than t"): ddpm_step(model, sched, x, 3, prev_t=5)
    with pytest.raises(ValueError, match="noise must have the shape of x_t"): ddpm_step(model, sched, x, 3, noise=torch.randn(4, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"): ddpm_sample(model, sched, [[0.0, 1.0]])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"): ddpm_sample(model, sched, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="keep_every must be a positive int"): ddpm_sample(model, sched, x, keep_every=0)
    bad = lambda x, t: x[:, :1]
    with pytest.raises(ValueError, match=r"model must return predicted noise of the input's shape \(4, 2\); got \(4, 1\)"):
        ddpm_loss(bad, sched, x)
    with pytest.raises(ValueError, match="model must return predicted noise"): ddpm_sample(bad, sched, x)
    with pytest.raises(ValueError, match="eps must have the shape of x_t"): ddpm_update(sched, x[:, :1], x, 3)
    with pytest.raises(ValueError, match=r"x must be points of shape \(B, 2\)"): MLPDenoiser()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="t must have one timestep per point"): MLPDenoiser()(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="points must be \\(N, dim\\)"): train_points(MLPDenoiser(), torch.randn(10), sched, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive int"): train_points(MLPDenoiser(), x, sched, steps=0, progress=False)
