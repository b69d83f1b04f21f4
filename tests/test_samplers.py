"""diffcourse.samplers: whole sampling loops against diffusers' schedulers (DDIM, Euler, Heun, DPM-Solver++ 2M
deterministically; DDPM, DDIM with η and Euler ancestral with the same noise draws), for every spacing and for 5, 10
and 50 steps, and for Karras σ spacing; the correct maths where diffusers has a bug; Euler ancestral as DDPM with the
posterior variance; timesteps and sigmas; determinism; no NaN for any valid schedule, sampler, spacing and step count;
the warning for an unclipped start at pure noise; and bad inputs caught before any model call."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck

from diffcourse.schedules import NoiseSchedule
from diffcourse.ddpm import MLPDenoiser
from diffcourse.unet import ResAttnUNet
from diffcourse.samplers import (SAMPLERS, SPACINGS, KARRAS_SAMPLERS, sample, sampler_timesteps, sigmas_for, max_steps,
                                 n_model_calls, ddim_update, euler_update, karras_sigmas, sigma_to_t)

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                       HeunDiscreteScheduler, DPMSolverMultistepScheduler)
from diffusers.utils import logging as diffusers_logging

diffusers_logging.set_verbosity_error()   # diffusers warns when scale_model_input is skipped; our reference loops call it

# Many cross-checks start unclipped at t = 999 of the cosine schedule on purpose; `sample` warns there (tested below).
pytestmark = pytest.mark.filterwarnings(r"ignore:sample\(\) starts at t=:UserWarning")

# Float32 rounding: with the same ᾱ handed to diffusers the loops do the same float32 arithmetic (measured: bitwise
# equal); we allow 1e-5 of the output's scale, far below any real difference (a wrong timestep or coefficient moves
# the result by 1e-2 or more of its scale).
RTOL = 1e-5


def dummy_model(x, t, **kw):
    "A deterministic, smooth stand-in ε-predictor; takes integer or fractional timesteps (B,)."
    tt = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    return 0.95 * x * (tt / 1000).sqrt() + 0.1 * torch.sin(3 * x) * torch.cos(tt / 100)


SCHEDULES = {"linear": NoiseSchedule.linear(1000), "cosine": NoiseSchedule.cosine(1000)}
DIFFUSERS_CONFIG = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
                    "cosine": dict(beta_schedule="squaredcos_cap_v2")}
REFERENCE = {"ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True)),
             "euler": (EulerDiscreteScheduler, dict(use_karras_sigmas=False, final_sigmas_type="zero")),
             "heun": (HeunDiscreteScheduler, dict(use_karras_sigmas=False)),
             "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                           lower_order_final=True, euler_at_final=False)),
             "euler_a": (EulerAncestralDiscreteScheduler, {}),
             "ddpm_beta": (DDPMScheduler, dict(clip_sample=False, variance_type="fixed_large")),
             "ddpm_posterior": (DDPMScheduler, dict(clip_sample=False, variance_type="fixed_small"))}


def make_ref(key, sched, spacing, own_alphas=False, name=None):
    "The diffusers scheduler for `key`, with our ᾱ handed over (same arithmetic) unless `own_alphas`."
    cls, kw = REFERENCE[key]
    if own_alphas: return cls(num_train_timesteps=sched.T, timestep_spacing=spacing, **kw, **DIFFUSERS_CONFIG[name])
    ref = cls(num_train_timesteps=sched.T, trained_betas=sched.betas.numpy(), timestep_spacing=spacing, **kw)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    return ref


def ref_loop(ref, x, steps, generator=None, **step_kw):
    "A diffusers pipeline's loop: scale the noise, then scale_model_input, model, step."
    ref.set_timesteps(steps)
    x = x * ref.init_noise_sigma
    for t in ref.timesteps:
        eps = dummy_model(ref.scale_model_input(x, t), t.expand(len(x)))
        x = ref.step(eps, t, x, **({"generator": generator} if generator is not None else {}), **step_kw).prev_sample
    return x


def assert_close(ours, theirs, rtol=RTOL):
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * max(scale, 1.0))


def noise(shape=(6, 1, 4, 4), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- deterministic samplers against diffusers, whole loops ---

DET_CASES = [(s, sp) for s in ("ddim", "euler", "heun", "dpmpp_2m") for sp in SPACINGS if not (s == "ddim" and sp == "linspace")]


@pytest.mark.parametrize("steps", [5, 10, 50])
@pytest.mark.parametrize("sampler,spacing", DET_CASES, ids=[f"{s}-{sp}" for s, sp in DET_CASES])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_deterministic_samplers_match_diffusers(name, sampler, spacing, steps):
    sched, x = SCHEDULES[name], noise()
    ours = sample(dummy_model, sched, x, sampler=sampler, steps=steps, spacing=spacing)
    theirs = ref_loop(make_ref(sampler, sched, spacing), x, steps)
    assert torch.isfinite(ours).all()
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_match_diffusers_with_its_own_alphas(name, sampler):
    "Built from its own config, diffusers computes ᾱ by a float32 cumprod (we use float64, then round): 2e-6 apart at most."
    sched, x = SCHEDULES[name], noise()
    for spacing in ("leading", "trailing"):
        ours = sample(dummy_model, sched, x, sampler=sampler, steps=10, spacing=spacing)
        theirs = ref_loop(make_ref(sampler, sched, spacing, own_alphas=True, name=name), x, 10)
        assert_close(ours, theirs, rtol=2e-5)


def ddim_by_hand(sched, x, timesteps):
    "DDIM η=0 written out from the paper's formula, stepping to the next timestep of the list (ᾱ = 1 after the last)."
    ac = sched.alphas_cumprod
    ts = timesteps.tolist()
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        eps = dummy_model(x, torch.full((len(x),), t))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@pytest.mark.parametrize("steps", [5, 10, 50])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_linspace_follows_the_maths_not_diffusers(name, steps):
    """diffusers' DDIMScheduler.step steps to t - T // steps instead of the next timestep of its list, which is wrong
    for 'linspace' (diffusers issues #11347, #12633): check the DDIM formula instead, and that diffusers differs."""
    sched, x = SCHEDULES[name], noise()
    ours = sample(dummy_model, sched, x, sampler="ddim", steps=steps, spacing="linspace")
    assert_close(ours, ddim_by_hand(sched, x, sampler_timesteps(1000, steps, "linspace")))
    theirs = ref_loop(make_ref("ddim", sched, "linspace"), x, steps)
    assert (ours - theirs).abs().max() > 1e-3 * theirs.abs().max()
    # the hand-written reference itself agrees with diffusers where diffusers is right
    assert_close(ddim_by_hand(sched, x, sampler_timesteps(1000, steps, "leading")),
                 ref_loop(make_ref("ddim", sched, "leading"), x, steps))


# --- stochastic samplers: the same noise draws ---

@pytest.mark.parametrize("steps", [5, 10, 50])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_euler_ancestral_matches_diffusers(name, spacing, steps):
    sched, x = SCHEDULES[name], noise()
    ours = sample(dummy_model, sched, x, sampler="euler_a", steps=steps, spacing=spacing, generator=torch.Generator().manual_seed(1))
    theirs = ref_loop(make_ref("euler_a", sched, spacing), x, steps, generator=torch.Generator().manual_seed(1))
    assert_close(ours, theirs)


@pytest.mark.parametrize("steps", [5, 10, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddpm_matches_diffusers(name, variance, spacing, steps):
    sched, x = SCHEDULES[name], noise()
    ours = sample(dummy_model, sched, x, sampler="ddpm", variance=variance, steps=steps, spacing=spacing, generator=torch.Generator().manual_seed(1))
    theirs = ref_loop(make_ref(f"ddpm_{variance}", sched, spacing), x, steps, generator=torch.Generator().manual_seed(1))
    assert_close(ours, theirs)


@pytest.mark.parametrize("steps", [5, 10, 50])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddpm_trailing_differs_from_diffusers_only_by_its_final_noise(name, steps):
    """With 'trailing' the last timestep is T/steps - 1 > 0, and DDPMScheduler adds noise whenever t > 0, so its
    final x_0 gets noise of variance β = 1 - ᾱ_t ('fixed_large'). We add none on the step to x_0."""
    sched, x = SCHEDULES[name], noise()
    ours = sample(dummy_model, sched, x, sampler="ddpm", steps=steps, spacing="trailing", generator=torch.Generator().manual_seed(1))
    theirs = ref_loop(make_ref("ddpm_beta", sched, "trailing"), x, steps, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps): z = torch.randn(x.shape, generator=g)           # diffusers' last draw
    t_last = int(sampler_timesteps(1000, steps, "trailing")[-1])
    assert t_last > 0
    assert_close(ours + (1 - sched.alphas_cumprod[t_last]).sqrt() * z, theirs)
    # with the posterior variance the final noise is sqrt(1e-20): nothing
    ours = sample(dummy_model, sched, x, sampler="ddpm", variance="posterior", steps=steps, spacing="trailing", generator=torch.Generator().manual_seed(1))
    assert_close(ours, ref_loop(make_ref("ddpm_posterior", sched, "trailing"), x, steps, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_eta_matches_diffusers(name, spacing, eta):
    sched, x = SCHEDULES[name], noise()
    for steps in (5, 50):
        ours = sample(dummy_model, sched, x, sampler="ddim", eta=eta, steps=steps, spacing=spacing, generator=torch.Generator().manual_seed(1))
        theirs = ref_loop(make_ref("ddim", sched, spacing), x, steps, generator=torch.Generator().manual_seed(1), eta=eta)
        assert torch.isfinite(ours).all()
        if torch.isnan(theirs).any():
            # diffusers takes sqrt(1 - ᾱ_s - σ_ts²) with σ_ts = η sqrt(β̃): for η = 1 and ᾱ_t ≈ 2e-9 (cosine, t = 999)
            # σ_ts² rounds above 1 - ᾱ_s and the root of -6e-8 is NaN. We clamp it at 0; check the same maths by DDPM.
            assert (name, spacing, eta, steps) == ("cosine", "trailing", 1.0, 5)
            theirs = sample(dummy_model, sched, x, sampler="ddpm", variance="posterior", steps=steps, spacing=spacing,
                            generator=torch.Generator().manual_seed(1))
        assert_close(ours, theirs)


# --- Karras σ spacing against diffusers' use_karras_sigmas ---

KARRAS_REF = {"euler": (EulerDiscreteScheduler, dict(final_sigmas_type="zero")),
              "heun": (HeunDiscreteScheduler, {}),
              "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                            lower_order_final=True, euler_at_final=False))}


def karras_ref(sampler, sched, steps, sigma_min=None, sigma_max=None):
    """diffusers' scheduler for `sampler` with use_karras_sigmas=True (its default 'linspace' spacing, whose end points are
    the schedule's smallest and largest σ), set to `steps`. EulerAncestralDiscreteScheduler has no Karras option: it gets
    the σ's and timesteps of the Euler one. A σ range is handed to `_convert_to_karras` (only Euler has it as config)."""
    cls, kw = KARRAS_REF["euler" if sampler == "euler_a" else sampler]
    ref = cls(num_train_timesteps=sched.T, trained_betas=sched.betas.numpy(), use_karras_sigmas=True, **kw)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    if sigma_min is not None or sigma_max is not None:
        convert = ref._convert_to_karras
        def with_range(in_sigmas, num_inference_steps):
            s = np.array(in_sigmas, dtype=np.float64)
            if sigma_max is not None: s[0] = sigma_max
            if sigma_min is not None: s[-1] = sigma_min
            return convert(in_sigmas=s, num_inference_steps=num_inference_steps)
        ref._convert_to_karras = with_range
    ref.set_timesteps(steps)
    if sampler == "euler_a":
        anc = EulerAncestralDiscreteScheduler(num_train_timesteps=sched.T, trained_betas=sched.betas.numpy())
        anc.alphas_cumprod = sched.alphas_cumprod.clone()
        anc.set_timesteps(steps)
        anc.sigmas, anc.timesteps = ref.sigmas.clone(), ref.timesteps.clone()
        ref = anc
    return ref


def karras_loop(ref, x, generator=None, seen=None):
    """A pipeline's loop over an already set scheduler, walking its steps by index (set_begin_index(0)): on the cosine
    schedule DPM-Solver's rounded Karras timesteps repeat (999, 999, ...), and its look-up of the first step by value
    would then start at the second and run off the end of its σ's."""
    ref.set_begin_index(0)
    x = x * ref.init_noise_sigma
    for t in ref.timesteps:
        tt = t.expand(len(x))
        if seen is not None: seen.append(tt)
        x = ref.step(dummy_model(ref.scale_model_input(x, t), tt), t, x,
                     **({"generator": generator} if generator is not None else {})).prev_sample
    return x


@pytest.mark.parametrize("steps", [2, 5, 10, 50])
@pytest.mark.parametrize("sampler", KARRAS_SAMPLERS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_karras_spacing_matches_diffusers(name, sampler, steps):
    "The whole loop, and the timesteps the model is called with (fractional for the σ-space samplers, rounded for DPM-Solver)."
    sched, x = SCHEDULES[name], noise()
    gen = (lambda: torch.Generator().manual_seed(1)) if sampler == "euler_a" else (lambda: None)
    ours_t, theirs_t = [], []
    ours = sample(lambda x, t: ours_t.append(t) or dummy_model(x, t), sched, x, sampler=sampler, steps=steps, spacing="karras", generator=gen())
    theirs = karras_loop(karras_ref(sampler, sched, steps), x, gen(), theirs_t)
    assert torch.isfinite(ours).all()
    assert_close(ours, theirs)
    assert len(ours_t) == len(theirs_t) == n_model_calls(sampler, steps)
    integer = sampler == "dpmpp_2m" or all(bool((b == b.round()).all()) for b in theirs_t)   # e.g. two steps, linear: t = 999, 0
    for a, b in zip(ours_t, theirs_t):
        assert a.dtype == (torch.long if integer else torch.float32) and torch.equal(a.to(b.dtype), b)


@pytest.mark.parametrize("sampler", KARRAS_SAMPLERS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_karras_with_a_given_sigma_range_matches_diffusers(name, sampler):
    sched, x = SCHEDULES[name], noise()
    lo, hi = 0.03, 80.0
    for steps in (5, 20):
        gen = (lambda: torch.Generator().manual_seed(1)) if sampler == "euler_a" else (lambda: None)
        ours = sample(dummy_model, sched, x, sampler=sampler, steps=steps, spacing="karras", sigma_min=lo, sigma_max=hi, generator=gen())
        assert_close(ours, karras_loop(karras_ref(sampler, sched, steps, sigma_min=lo, sigma_max=hi), x, gen()))
    # Euler has the range as config: the same σ's
    ref = EulerDiscreteScheduler(num_train_timesteps=1000, trained_betas=sched.betas.numpy(), use_karras_sigmas=True, sigma_min=lo, sigma_max=hi)
    ref.alphas_cumprod = sched.alphas_cumprod.clone(); ref.set_timesteps(20)
    assert torch.equal(karras_sigmas(sched, 20, sigma_min=lo, sigma_max=hi), ref.sigmas)


def test_karras_one_step():
    """One step goes from σ_max to 0. diffusers' Euler and Heun take their range from their 'linspace' timesteps, which
    for one step are [0], so their one-step Karras schedule sits at σ(0) instead (DPM-Solver reads the table: σ_max)."""
    sched, x = SCHEDULES["cosine"], noise()
    for sampler in KARRAS_SAMPLERS:
        seen = []
        sample(lambda x, t: seen.append(t) or dummy_model(x, t), sched, x, sampler=sampler, steps=1, spacing="karras", generator=torch.Generator())
        assert [int(t[0]) for t in seen] == [999]
    assert_close(sample(dummy_model, sched, x, sampler="dpmpp_2m", steps=1, spacing="karras"),
                 karras_loop(karras_ref("dpmpp_2m", sched, 1), x))
    ref = karras_ref("euler", sched, 1)
    assert ref.timesteps[0] < 1e-3 and not torch.equal(karras_sigmas(sched, 1), ref.sigmas)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_karras_sigmas_and_sigma_to_t(name):
    sched = SCHEDULES[name]
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt()
    s = karras_sigmas(sched, 10)
    assert s.dtype == torch.float32 and s.shape == (11,) and s[-1] == 0 and (s[:-1] > s[1:]).all()
    torch.testing.assert_close(s[[0, 9]], table[[-1, 0]])                         # the schedule's largest and smallest σ
    rho = 7.0                                                                    # the formula, by hand
    i = torch.arange(10, dtype=torch.float64)
    by_hand = (table[-1].double() ** (1 / rho) + i / 9 * (table[0].double() ** (1 / rho) - table[-1].double() ** (1 / rho))) ** rho
    torch.testing.assert_close(s[:-1], by_hand.float())
    even = karras_sigmas(sched, 5, sigma_min=1.0, sigma_max=5.0, rho=1.0)        # ρ = 1: evenly spaced in σ
    torch.testing.assert_close(even, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    # sigma_to_t inverts σ_t at the training timesteps, interpolates log σ in between, and equals diffusers' timesteps
    ts = torch.tensor([999.0, 500.0, 37.0, 0.0])
    torch.testing.assert_close(sigma_to_t(sched, sigmas_for(sched, ts)[:-1]), ts, atol=2e-3, rtol=0)
    mid = sigma_to_t(sched, (table[500] * table[501]).sqrt()[None])                 # the geometric mean: halfway in log σ
    torch.testing.assert_close(mid, torch.tensor([500.5]), atol=1e-3, rtol=0)
    ref = karras_ref("euler", sched, 10)
    ours = []
    sample(lambda x, t: ours.append(t[0]) or dummy_model(x, t), sched, noise(), sampler="euler", steps=10, spacing="karras")
    assert torch.equal(torch.stack(ours), ref.timesteps)


def test_karras_refused_for_ddpm_and_ddim_and_its_arguments_for_other_spacings():
    sched, x = SCHEDULES["cosine"], noise()
    for sampler in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match=r"spacing='karras' places the noise levels σ, which only the samplers"):
            sample(dummy_model, sched, x, sampler=sampler, spacing="karras")
        with pytest.raises(ValueError, match="spacing='karras'"):
            max_steps(1000, sampler, "karras")
    with pytest.raises(ValueError, match="use karras_sigmas"):
        sampler_timesteps(1000, 10, "karras", "euler")
    for kw in (dict(sigma_max=80.0), dict(sigma_min=0.1), dict(rho=5.0)):
        with pytest.raises(ValueError, match="apply to spacing='karras' only"):
            sample(dummy_model, sched, x, sampler="euler", spacing="trailing", **kw)


def test_karras_on_a_schedule_whose_largest_sigma_overflows():
    "ᾱ_999 = e^-100 is 0 in float32: the default σ_max is inf, so 'karras' asks for one; with it, sampling works."
    sched = NoiseSchedule.linear(1000, 1e-3, 0.2)
    with pytest.raises(ValueError, match="pass a finite sigma_max"):
        sample(dummy_model, sched, noise(), sampler="euler", steps=10, spacing="karras")
    out = sample(dummy_model, sched, noise(), sampler="heun", steps=10, spacing="karras", sigma_max=80.0)
    assert torch.isfinite(out).all()


def gaussian_model(sched, mu=0.5, s=0.5):
    "The exact ε-predictor for data x_0 ~ N(mu, s²), at fractional t too (σ interpolated in log σ, as sigma_to_t does)."
    log_table = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt().log()
    def model(x, t):
        t = t.double()
        lo = t.floor().long().clamp(max=sched.T - 2)
        sig = torch.exp(log_table[lo] + (t - lo) * (log_table[lo + 1] - log_table[lo])).reshape(-1, *([1] * (x.ndim - 1)))
        a = 1 / (1 + sig ** 2)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return model


def test_karras_spacing_repairs_heun_at_few_steps():
    """With the exact noise predictor of a Gaussian, Heun from t = 999 of the cosine schedule is ruined by its first
    step with 'trailing' (σ ≈ 20,000 down to 6.4 in one step). Karras σ's from σ_max = 80 repair it: then it is more
    accurate than Euler, as a second-order method should be."""
    sched, mu, s = SCHEDULES["cosine"], 0.5, 0.5
    x = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = gaussian_model(sched, mu, s)
    def err(steps, **kw):
        "RMS distance to where the ODE from the start lands: x̃ - μ scales with sqrt(s² + σ²)."
        smax = float(karras_sigmas(sched, steps, sigma_max=kw.get("sigma_max"))[0])
        exact = mu + s * (smax * x - mu) / (s ** 2 + smax ** 2) ** 0.5
        return (sample(model, sched, x, steps=steps, **kw) - exact).pow(2).mean().sqrt().item()
    for steps in (10, 20):
        heun_k, euler_k = (err(steps, sampler=sm, spacing="karras", sigma_max=80.0) for sm in ("heun", "euler"))
        heun_tr = err(steps, sampler="heun", spacing="trailing")
        assert heun_k < heun_tr / 20, (steps, heun_k, heun_tr)
        assert heun_k < euler_k / (1.2 if steps == 10 else 2), (steps, heun_k, euler_k)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_euler_ancestral_is_ddpm_with_posterior_variance(name, spacing, clip):
    """In σ-space, Euler ancestral's step is x̃' = x̂_0 + (σ'/σ)² (x̃ - x̂_0) + σ_up z, which is DDPM's posterior mean and
    noise divided by sqrt(ᾱ_s): the same sampler, with the same noise draws. 'trailing' starts Euler ancestral at σ_max x
    (diffusers' init_noise_sigma) rather than at x_t / sqrt(ᾱ) = sqrt(σ_max² + 1) x, so DDPM starts there too."""
    sched, x = SCHEDULES[name], noise()
    for steps in (5, 10, 50):
        a = sample(dummy_model, sched, x, sampler="euler_a", steps=steps, spacing=spacing, clip_sample=clip, generator=torch.Generator().manual_seed(3))
        start = x
        if spacing == "trailing":
            s = sigmas_for(sched, sampler_timesteps(1000, steps, spacing, "euler_a"))[0]
            start = (x * s) / (s ** 2 + 1) ** 0.5
        b = sample(dummy_model, sched, start, sampler="ddpm", variance="posterior", steps=steps, spacing=spacing, clip_sample=clip,
                   generator=torch.Generator().manual_seed(3))
        # Where the clamp keeps an x̂_0 made at t = 999 of the cosine schedule, float32 rounding of x_t (6e-8) reaches it
        # multiplied by 1/sqrt(ᾱ) = 20,000: two float32 computations of the same maths differ by about 1e-3 there.
        assert_close(a, b, rtol=1e-3 if (name, spacing, clip) == ("cosine", "trailing", 1.0) else 2e-5)
    # a wrong coefficient is far outside those tolerances: DDPM with β instead of β̃
    c = sample(dummy_model, sched, start, sampler="ddpm", variance="beta", steps=steps, spacing=spacing, clip_sample=clip, generator=torch.Generator().manual_seed(3))
    assert (a - c).abs().max() > 1e-2 * c.abs().max()


def test_ddim_eta_one_is_euler_ancestral_only_without_the_clamp():
    "DDIM with η = 1 is the same sampler unclipped; with the clamp it re-noises along the model's ε̂, not the clamped x̂_0."
    sched, x = SCHEDULES["linear"], noise()
    kw = lambda: dict(steps=20, generator=torch.Generator().manual_seed(4))
    assert_close(sample(dummy_model, sched, x, sampler="ddim", eta=1.0, **kw()), sample(dummy_model, sched, x, sampler="euler_a", **kw()), rtol=2e-5)
    a = sample(dummy_model, sched, x, sampler="ddim", eta=1.0, clip_sample=1.0, **kw())
    b = sample(dummy_model, sched, x, sampler="euler_a", clip_sample=1.0, **kw())
    assert (a - b).abs().max() > 1e-2


# --- timesteps and sigmas ---

TIMESTEP_REF = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler,
                "dpmpp_2m": DPMSolverMultistepScheduler, "euler_a": EulerAncestralDiscreteScheduler, "ddpm": DDPMScheduler}


@pytest.mark.parametrize("sampler", list(TIMESTEP_REF))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_sigmas_match_diffusers(sampler, spacing):
    for T in (1000, 37):
        sched = NoiseSchedule.linear(T, 1e-3, 0.2) if T < 100 else NoiseSchedule.linear(T)
        for steps in sorted({1, 2, 3, 5, 7, 10, 50, T // 2, max_steps(T, sampler, spacing)} - {0}):
            if steps > max_steps(T, sampler, spacing): continue
            ref = TIMESTEP_REF[sampler](num_train_timesteps=T, timestep_spacing=spacing, trained_betas=sched.betas.numpy())
            ref.alphas_cumprod = sched.alphas_cumprod.clone()
            ref.set_timesteps(steps)
            theirs = ref.timesteps
            if sampler == "heun": theirs = torch.cat([theirs[:1], theirs[1::2]])          # Heun repeats all but the first
            ours = sampler_timesteps(T, steps, spacing, sampler)
            assert ours.dtype == theirs.dtype
            if spacing == "trailing" and len(theirs) == steps + 1:   # diffusers' float-arange bug: one extra, -1
                assert theirs[-1] == -1
                theirs = theirs[:-1]
            assert torch.equal(ours, theirs), (T, steps)
            if hasattr(ref, "sigmas") and sampler != "heun":
                assert torch.equal(sigmas_for(sched, ours), ref.sigmas[:steps + 1].to(torch.float32)) or len(ref.timesteps) != steps


def test_trailing_never_gives_a_negative_timestep():
    "diffusers: np.arange(1000, 0, -1000/61) has 62 values, so its 'trailing' 61-step schedule ends at t = -1."
    ref = DDIMScheduler(timestep_spacing="trailing"); ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1
    ours = sampler_timesteps(1000, 61, "trailing")
    assert len(ours) == 61 and ours.min() >= 0 and torch.equal(ours, ref.timesteps[:61])
    for steps in range(1, 1001):
        ts = sampler_timesteps(1000, steps, "trailing")
        assert len(ts) == steps and ts.min() >= 0 and ts.max() == 999 and (ts[:-1] > ts[1:]).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_distinct_and_in_range_up_to_max_steps(sampler, spacing):
    for T in (1, 2, 10, 1000):
        for steps in {1, max_steps(T, sampler, spacing) // 2 or 1, max_steps(T, sampler, spacing)}:
            ts = sampler_timesteps(T, steps, spacing, sampler)
            assert len(ts) == steps and ts.min() >= 0 and ts.max() <= T - 1
            assert (ts[:-1] > ts[1:]).all(), (T, steps, ts)


# --- behaviour of sample() ---

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_determinism_and_model_calls(sampler):
    sched, x = SCHEDULES["cosine"], noise()
    calls = []
    def model(x, t, **kw):
        calls.append(t); return dummy_model(x, t)
    a = sample(model, sched, x, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(3))
    assert len(calls) == n_model_calls(sampler, 8) and all(t.shape == (len(x),) and t.dtype == torch.long for t in calls)
    b = sample(dummy_model, sched, x, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = sample(dummy_model, sched, x, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, c) != (sampler in ("ddpm", "euler_a"))        # only the stochastic ones depend on the seed


def test_fractional_timesteps_only_for_sigma_samplers_with_linspace():
    sched, x = SCHEDULES["linear"], noise()
    for sampler in SAMPLERS:
        for spacing in SPACINGS:
            seen = []
            sample(lambda x, t: seen.append(t.dtype) or dummy_model(x, t), sched, x, sampler=sampler, steps=7, spacing=spacing,
                   generator=torch.Generator().manual_seed(0))
            frac = sampler in ("euler", "euler_a", "heun") and spacing == "linspace"
            assert set(seen) == ({torch.float32} if frac else {torch.long}), (sampler, spacing)


def test_callback_and_model_kwargs():
    sched, x = SCHEDULES["cosine"], noise()
    labels = torch.arange(len(x))
    def model(x, t, labels=None):
        assert labels is not None and labels.shape == (len(x),)
        return dummy_model(x, t)
    for sampler in SAMPLERS:
        seen = []
        out = sample(model, sched, x, sampler=sampler, steps=6, labels=labels, generator=torch.Generator().manual_seed(0),
                     callback=lambda i, t, xt, x0: seen.append((i, t, xt.clone(), x0.shape)))
        assert [s[0] for s in seen] == list(range(6))
        assert [s[1] for s in seen] == sampler_timesteps(1000, 6, "leading", sampler).tolist()
        assert all(s[3] == x.shape for s in seen)
        torch.testing.assert_close(seen[-1][2], out)             # the last x_t is the result


def test_works_with_a_unet_and_points():
    unet = ResAttnUNet(in_channels=1, channels=(8, 16), head_dim=8).eval()
    x = noise((2, 1, 8, 8))
    for sampler in SAMPLERS:
        out = sample(unet, SCHEDULES["cosine"], x, sampler=sampler, steps=3, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and torch.isfinite(out).all()
    mlp = MLPDenoiser(dim=2).eval()
    out = sample(mlp, SCHEDULES["linear"], noise((16, 2)), sampler="dpmpp_2m", steps=5)
    assert out.shape == (16, 2) and torch.isfinite(out).all()


def test_float64_noise_with_a_float64_model():
    x = noise().double()
    for sampler in SAMPLERS:
        out = sample(dummy_model, SCHEDULES["linear"], x, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.float64 and torch.isfinite(out).all()


# --- the warning for an unclipped start at pure noise ---

def our_warnings(f):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        f()
    return [x for x in w if "sample() starts at t=" in str(x.message)]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_warns_once_when_starting_unclipped_where_x0_amplifies_errors_20000_fold(sampler):
    "Cosine, T = 1000, 'trailing': t = 999, where 1/sqrt(ᾱ) = 20,291. One warning per call, naming the remedies, at the caller."
    sched, x = SCHEDULES["cosine"], noise()
    run = lambda **kw: sample(dummy_model, sched, x, sampler=sampler, steps=10, generator=torch.Generator().manual_seed(0), **kw)
    w = our_warnings(lambda: run(spacing="trailing"))
    assert len(w) == 1 and w[0].category is UserWarning and w[0].filename == __file__
    msg = str(w[0].message)
    assert "t=999" in msg and "20,291" in msg and "clip_sample=1.0" in msg and "spacing='leading' with fewer than T steps" in msg and "smaller sigma_max" in msg
    assert not our_warnings(lambda: run(spacing="leading"))                   # starts at t = 900: 1/sqrt(ᾱ) = 6.5
    assert not our_warnings(lambda: run(spacing="trailing", clip_sample=1.0))
    assert not our_warnings(lambda: sample(dummy_model, SCHEDULES["linear"], x, sampler=sampler, steps=10, spacing="trailing",
                                           generator=torch.Generator().manual_seed(0)))   # linear: 1/sqrt(ᾱ_999) = 157


def test_warning_with_all_steps_and_with_karras():
    sched, x = SCHEDULES["cosine"], noise((2, 1, 2, 2))
    assert len(our_warnings(lambda: sample(dummy_model, sched, x, sampler="ddpm", steps=1000, generator=torch.Generator()))) == 1
    assert len(our_warnings(lambda: sample(dummy_model, sched, x, sampler="heun", steps=5, spacing="karras"))) == 1
    assert not our_warnings(lambda: sample(dummy_model, sched, x, sampler="heun", steps=5, spacing="karras", sigma_max=80.0))


# --- no NaN for any valid input ---

def schedules_strategy():
    T = st.integers(1, 1000)
    return st.one_of(T.map(NoiseSchedule.cosine), T.map(NoiseSchedule.linear), T.map(NoiseSchedule.sigmoid),
                     T.map(lambda T: NoiseSchedule.linear(T, 1e-3, 0.2) if T > 1 else NoiseSchedule.linear(T)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sched=schedules_strategy(), sampler=st.sampled_from(SAMPLERS), spacing=st.sampled_from(SPACINGS),
       frac=st.floats(0, 1), eta=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_no_nan_for_any_valid_schedule_sampler_spacing_and_steps(sched, sampler, spacing, frac, eta, seed):
    hi = max_steps(sched.T, sampler, spacing)
    steps = 1 + round(frac * (hi - 1))
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
    try:
        out = sample(dummy_model, sched, x, sampler=sampler, steps=steps, spacing=spacing,
                     eta=eta if sampler == "ddim" else 0.0, generator=torch.Generator().manual_seed(seed))
    except ValueError as e:    # only a schedule whose ᾱ underflows float32 (linear to β = 0.2 over hundreds of steps)
        assert "too small for float32" in str(e) and sched.alphas_cumprod.min() < 3e-38, (sched, str(e))
        return
    assert out.shape == x.shape and torch.isfinite(out).all(), (sched, sampler, spacing, steps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sched=schedules_strategy(), sampler=st.sampled_from(KARRAS_SAMPLERS), frac=st.floats(0, 1), top=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_no_nan_with_karras_spacing(sched, sampler, frac, top, seed):
    "Any step count, and σ_max anywhere in the schedule's range (or its default, when that is finite)."
    steps = 1 + round(frac * (sched.T - 1))
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt()
    hi = float(table[-1]) if torch.isfinite(table[-1]) else 1e3
    smax = None if top > 0.5 and torch.isfinite(table[-1]) else float(table[0]) + top * (hi - float(table[0]))
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
    kw = {} if smax is None else dict(sigma_max=smax)
    try:
        out = sample(dummy_model, sched, x, sampler=sampler, steps=steps, spacing="karras", generator=torch.Generator().manual_seed(seed), **kw)
    except ValueError as e:      # a one-level schedule (T = 1) has no range; a σ_max at σ_min leaves none either
        assert "sigma_min must be smaller than sigma_max" in str(e), str(e)
        return
    assert out.shape == x.shape and torch.isfinite(out).all(), (sched, sampler, steps, smax)


# --- bad inputs: a clear error before any model call ---

class CountingUNetLike(nn.Module):
    "Declares in_channels and size_multiple like diffcourse's UNet, and counts its calls."
    in_channels, size_multiple = 1, 4
    def __init__(self):
        super().__init__(); self.w = nn.Parameter(torch.zeros(())); self.calls = 0
    def forward(self, x, t):
        self.calls += 1; return dummy_model(x, t)


BAD = [
    (dict(sampler="dpm++"), ValueError, "sampler must be one of"),
    (dict(sampler=None), ValueError, "sampler must be one of"),
    (dict(steps=0), ValueError, "steps must be an int from 1 to 1000"),
    (dict(steps=1001), ValueError, "steps must be an int from 1 to 1000"),
    (dict(steps=10.0), ValueError, "steps must be an int"),
    (dict(steps=True), ValueError, "steps must be an int"),
    (dict(sampler="dpmpp_2m", spacing="linspace", steps=1000), ValueError, "at most T-1"),
    (dict(spacing="uniform"), ValueError, "spacing must be one of"),
    (dict(spacing="Leading"), ValueError, "spacing must be one of"),
    (dict(eta=1.5), ValueError, "eta must be a number in [0, 1]"),
    (dict(eta=-0.1), ValueError, "eta must be a number in [0, 1]"),
    (dict(sampler="euler", eta=0.5), ValueError, "eta applies to sampler='ddim' only"),
    (dict(variance="posterior"), ValueError, "variance applies to sampler='ddpm' only"),
    (dict(sampler="ddpm", variance="large"), ValueError, "variance must be one of"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(callback=3), TypeError, "callback must be callable"),
    (dict(clip_sample=0), ValueError, "clip_sample must be a positive number"),
    (dict(clip_sample=True), ValueError, "clip_sample must be a positive number"),
    (dict(spacing="karras"), ValueError, "spacing='karras' places the noise levels σ, which only the samplers"),
    (dict(sampler="ddpm", spacing="karras"), ValueError, "got sampler='ddpm'"),
    (dict(sampler="euler", sigma_max=80.0), ValueError, "sigma_min, sigma_max and rho apply to spacing='karras' only; got sigma_max=80.0"),
    (dict(sampler="euler", rho=3.0), ValueError, "apply to spacing='karras' only; got rho=3.0"),
    (dict(sampler="heun", spacing="karras", sigma_max=1e6), ValueError, "sigma_max must lie in the schedule's σ range"),
    (dict(sampler="heun", spacing="karras", sigma_min=1e-4), ValueError, "sigma_min must lie in the schedule's σ range"),
    (dict(sampler="euler", spacing="karras", sigma_min=50.0, sigma_max=10.0), ValueError, "sigma_min must be smaller than sigma_max"),
    (dict(sampler="euler", spacing="karras", sigma_max=float("nan")), ValueError, "sigma_max must be a positive finite number"),
    (dict(sampler="dpmpp_2m", spacing="karras", rho=0), ValueError, "rho must be a positive finite number"),
    (dict(sampler="euler", spacing="karras", steps=1001), ValueError, "steps must be an int from 1 to 1000"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_fail_before_any_model_call(kwargs, exc, msg):
    model = CountingUNetLike()
    with pytest.raises(exc, match=None) as e:
        sample(model, SCHEDULES["cosine"], noise((2, 1, 8, 8)), **kwargs)
    assert msg in str(e.value), str(e.value)
    assert model.calls == 0


BAD_X = [
    ([[0.0, 1.0]], TypeError, "must be a torch.Tensor"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.long), TypeError, "floating-point"),
    (torch.zeros(8), ValueError, "must be a batch (B, ...)"),
    (torch.zeros(0, 1, 8, 8), ValueError, "B >= 1"),
    (torch.full((2, 1, 8, 8), float("nan")), ValueError, "must be finite"),
    (torch.zeros(2, 3, 8, 8), ValueError, "(B, 1, H, W) for a model with in_channels=1"),
    (torch.zeros(2, 8, 8), ValueError, "(B, 1, H, W)"),
    (torch.zeros(2, 1, 10, 8), ValueError, "multiples of 4"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.float64), ValueError, "dtype torch.float64 but the model's parameters are torch.float32"),
]


@pytest.mark.parametrize("x,exc,msg", BAD_X, ids=[f"x{i}" for i in range(len(BAD_X))])
def test_bad_noise_fails_before_any_model_call(x, exc, msg):
    model = CountingUNetLike()
    with pytest.raises(exc) as e:
        sample(model, SCHEDULES["cosine"], x)
    assert msg in str(e.value), str(e.value)
    assert model.calls == 0


def test_a_schedule_that_underflows_float32_is_refused_up_front():
    sched = NoiseSchedule.linear(1000, 1e-3, 0.2)                    # ᾱ_999 = e^-100: 0 in float32
    calls = []
    for sampler in SAMPLERS:
        with pytest.raises(ValueError, match="too small for float32"):
            sample(lambda x, t: calls.append(t) or x, sched, noise(), sampler=sampler, steps=10, spacing="trailing")
    assert not calls
    out = sample(dummy_model, sched, noise(), sampler="euler", steps=10, spacing="leading")   # stops at t = 900
    assert torch.isfinite(out).all()


def test_bad_noise_for_points_and_wrong_model_output():
    with pytest.raises(ValueError, match=r"points \(B, 2\)"):
        sample(MLPDenoiser(dim=2), SCHEDULES["linear"], noise((4, 3)))
    with pytest.raises(TypeError, match="NoiseSchedule"):
        sample(dummy_model, "cosine", noise())
    with pytest.raises(TypeError, match="model must be callable"):
        sample(None, SCHEDULES["linear"], noise())
    with pytest.raises(ValueError, match="model must return predicted noise of the input's shape"):
        sample(lambda x, t: x[:, :1, :2], SCHEDULES["linear"], noise())


def test_step_functions_check_inputs():
    sched, x = SCHEDULES["linear"], noise()
    with pytest.raises(ValueError, match="prev_t must be earlier"):
        ddim_update(sched, x, x, 10, 20)
    with pytest.raises(ValueError, match="eps must have the shape"):
        euler_update(x, x[:1], 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        euler_update(x, x, 0.0, 0.0)


# --- restored: clip_sample against diffusers, and the samplers' relations (dropped by mistake when the Karras tests came in) ---

CLIP_REF = {"ddim": (DDIMScheduler, dict(clip_sample=True, clip_sample_range=1.0)),
            "heun": (HeunDiscreteScheduler, dict(clip_sample=True, clip_sample_range=1.0)),
            "ddpm": (DDPMScheduler, dict(clip_sample=True, clip_sample_range=1.0, variance_type="fixed_large"))}


@pytest.mark.parametrize("sampler", list(CLIP_REF))
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_clip_sample_matches_diffusers(name, sampler):
    sched, x = SCHEDULES[name], noise()
    cls, kw = CLIP_REF[sampler]
    spacings = {"ddim": ("leading", "trailing"), "heun": SPACINGS, "ddpm": ("leading", "linspace")}[sampler]
    for spacing in spacings:
        for steps in (5, 50):
            ref = cls(num_train_timesteps=1000, trained_betas=sched.betas.numpy(), timestep_spacing=spacing, **kw)
            ref.alphas_cumprod = sched.alphas_cumprod.clone()
            gen = (lambda: torch.Generator().manual_seed(1)) if sampler == "ddpm" else (lambda: None)
            ours = sample(dummy_model, sched, x, sampler=sampler, steps=steps, spacing=spacing, clip_sample=1.0, generator=gen())
            theirs = ref_loop(ref, x, steps, generator=gen())
            assert_close(ours, theirs)
            assert ours.abs().max() <= 1.0 + 1e-6 or sampler == "heun"   # Heun's last step is an Euler step from x̂_0's slope


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clip_sample_bites_and_a_wide_clip_changes_nothing(sampler):
    sched, x = SCHEDULES["cosine"], noise()
    kw = dict(sampler=sampler, steps=10, spacing="trailing")
    plain = sample(dummy_model, sched, x, generator=torch.Generator().manual_seed(0), **kw)
    wide = sample(dummy_model, sched, x, clip_sample=1e30, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(plain, wide)
    clipped = sample(dummy_model, sched, x, clip_sample=1.0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(clipped).all() and not torch.equal(clipped, plain)




@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_is_euler_in_sigma_space(name):
    "DDIM (η=0) and Euler are one method in two coordinates: with 'leading' (exact start sqrt(σ²+1)) they agree."
    sched, x = SCHEDULES[name], noise()
    for steps in (5, 50):
        assert_close(sample(dummy_model, sched, x, sampler="euler", steps=steps),
                     sample(dummy_model, sched, x, sampler="ddim", steps=steps), rtol=2e-6 * 10)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_eta_one_is_ddpm_with_posterior_variance(spacing):
    sched, x = SCHEDULES["linear"], noise()
    a = sample(dummy_model, sched, x, sampler="ddim", eta=1.0, steps=20, spacing=spacing, generator=torch.Generator().manual_seed(4))
    b = sample(dummy_model, sched, x, sampler="ddpm", variance="posterior", steps=20, spacing=spacing, generator=torch.Generator().manual_seed(4))
    assert_close(a, b)

