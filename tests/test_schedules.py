"Noise schedules: agreement with diffusers, the closed form against the iterated steps, SNR, bad inputs."
import math
import numpy as np, pytest, torch
from diffusers import DDPMScheduler
from diffcourse.schedules import NoiseSchedule, plot_schedules

KINDS = [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2'), ('sigmoid', 'sigmoid')]


@pytest.mark.parametrize('ours,kind', KINDS)
@pytest.mark.parametrize('T', [1000, 50])
def test_matches_diffusers(ours, kind, T):
    s, ref = getattr(NoiseSchedule, ours)(T), DDPMScheduler(num_train_timesteps=T, beta_schedule=kind)
    assert s.T == len(s) == T
    for v in (s.betas, s.alphas_cumprod):
        assert v.dtype == torch.float32 and v.shape == (T,)
    assert (s.betas - ref.betas).abs().max() < 1e-7
    assert (s.alphas_cumprod - ref.alphas_cumprod).abs().max() < 1e-6
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(32, 3, 4, 4, generator=g), torch.randn(32, 3, 4, 4, generator=g)
    t = torch.randint(0, T, (32,), generator=g)
    torch.testing.assert_close(s.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5, rtol=1e-5)


def test_linear_arguments_match_diffusers():
    s = NoiseSchedule.linear(200, beta_start=1e-3, beta_end=0.05)
    ref = DDPMScheduler(num_train_timesteps=200, beta_start=1e-3, beta_end=0.05)
    assert (s.alphas_cumprod - ref.alphas_cumprod).abs().max() < 1e-6


def test_defaults():
    assert NoiseSchedule.linear().T == NoiseSchedule.cosine().T == NoiseSchedule.sigmoid().T == 1000
    assert torch.equal(NoiseSchedule.linear().betas, NoiseSchedule.linear(1000, 1e-4, 0.02).betas)
    assert torch.equal(NoiseSchedule.cosine().betas, NoiseSchedule.cosine(1000, s=0.008, max_beta=0.999).betas)
    assert NoiseSchedule.cosine(T=10, max_beta=0.5).betas.max() <= 0.5


@pytest.mark.parametrize('make', [NoiseSchedule.linear, NoiseSchedule.cosine, NoiseSchedule.sigmoid])
def test_monotone(make):
    s = make(1000)
    ac = s.alphas_cumprod
    assert (ac.diff() < 0).all() and 0 < ac[-1] and ac[0] < 1
    assert ((s.betas > 0) & (s.betas < 1)).all()
    torch.testing.assert_close(s.alphas, 1 - s.betas)


def test_custom_betas_any_container():
    b = [0.1, 0.2, 0.3]
    for v in (b, np.array(b), torch.tensor(b, dtype=torch.float64)):
        s = NoiseSchedule(v)
        assert s.T == 3 and repr(s) == 'NoiseSchedule(T=3)'
        torch.testing.assert_close(s.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504]))


@pytest.mark.parametrize('make', [NoiseSchedule.linear, NoiseSchedule.cosine])
def test_add_noise_moments_large_batch(make):
    s, n = make(1000), 20_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.linspace(-1, 1, 8)
    for t in (0, 250, 600, 999):
        xt = s.add_noise(x0.expand(n, -1), torch.randn(n, 8, generator=g), t)
        ac = s.alphas_cumprod[t]
        se_mean, se_var = math.sqrt((1 - ac) / n), (1 - ac) * math.sqrt(2 / n)
        assert ((xt.mean(0) - ac.sqrt() * x0).abs() < 5 * se_mean).all()
        assert ((xt.var(0) - (1 - ac)).abs() < 5 * se_var).all()


def test_add_noise_per_example_timesteps():
    s = NoiseSchedule.cosine(100)
    x0, eps = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    t = torch.tensor([0, 10, 50, 99])
    out = s.add_noise(x0, eps, t)
    for i in range(4):
        a = s.alphas_cumprod[t[i]]
        torch.testing.assert_close(out[i], a.sqrt() * x0[i] + (1 - a).sqrt() * eps[i])
    assert torch.equal(s.add_noise(x0, eps, 10), s.add_noise(x0, eps, torch.full((4,), 10)))
    assert torch.equal(s.add_noise(x0, eps, [10]), s.add_noise(x0, eps, np.full(4, 10)))
    assert s.add_noise(x0.double(), eps.double(), t).dtype == torch.float64


def test_closed_form_equals_iterated_steps():
    "Running the one-step process t+1 times from x0 gives the distribution of add_noise(x0, ., t)."
    s, n = NoiseSchedule.linear(200, beta_end=0.05), 20_000
    g = torch.Generator().manual_seed(2)
    x0 = torch.tensor([-1., 0., 0.7])
    x = x0.expand(n, -1).clone()
    for t in range(s.T):
        x = s.forward_step(x, torch.randn(x.shape, generator=g), t)
        if t in (0, 20, 80, 199):
            jump = s.add_noise(x0.expand(n, -1), torch.randn(n, 3, generator=g), t)
            ac = s.alphas_cumprod[t]
            se_mean, se_var = math.sqrt((1 - ac) / n), (1 - ac) * math.sqrt(2 / n)
            for y in (x, jump):
                assert ((y.mean(0) - ac.sqrt() * x0).abs() < 5 * se_mean).all(), t
                assert ((y.var(0) - (1 - ac)).abs() < 5 * se_var).all(), t
    # and without sampling: the mean factor and variance of the chain follow the recursion exactly
    m, v = torch.tensor(1., dtype=torch.float64), torch.tensor(0., dtype=torch.float64)
    for b in s.betas.double():
        m, v = (1 - b).sqrt() * m, (1 - b) * v + b
    torch.testing.assert_close(m.float() ** 2, s.alphas_cumprod[-1])
    torch.testing.assert_close(v.float(), 1 - s.alphas_cumprod[-1])


def test_forward_step_formula():
    s = NoiseSchedule.sigmoid(50)
    x, eps = torch.randn(3, 5), torch.randn(3, 5)
    b = s.betas[7]
    torch.testing.assert_close(s.forward_step(x, eps, 7), (1 - b).sqrt() * x + b.sqrt() * eps)


@pytest.mark.parametrize('make', [NoiseSchedule.linear, NoiseSchedule.cosine, NoiseSchedule.sigmoid])
def test_snr_and_log_snr(make):
    s = make(1000)
    ac = s.alphas_cumprod.double()
    torch.testing.assert_close(s.snr().double(), ac / (1 - ac), rtol=1e-5, atol=0)
    torch.testing.assert_close(s.log_snr().double(), torch.log(ac / (1 - ac)), rtol=0, atol=1e-4)
    assert s.snr().dtype == s.log_snr().dtype == torch.float32 and s.snr().shape == (1000,)
    assert (s.log_snr().diff() < 0).all()
    t = torch.tensor([0, 3, 999])
    assert torch.equal(s.snr(t), s.snr()[t]) and torch.equal(s.log_snr(t), s.log_snr()[t])
    assert torch.equal(s.log_snr(5), s.log_snr()[[5]])
    torch.testing.assert_close(s.log_snr().exp(), s.snr(), rtol=1e-4, atol=0)


def test_plot_schedules():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plot_schedules({'a': NoiseSchedule.linear(10), 'b': NoiseSchedule.cosine(10)})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    plt.close(fig)
    fig = plot_schedules(NoiseSchedule.linear(10)); plt.close(fig)
    with pytest.raises(TypeError, match="NoiseSchedule objects"): plot_schedules([NoiseSchedule.linear(10), 'cosine'])


@pytest.mark.parametrize('call,err,msg', [
    (lambda: NoiseSchedule.linear(0), ValueError, "T must be at least 1; got T=0"),
    (lambda: NoiseSchedule.cosine(-5), ValueError, "T must be at least 1"),
    (lambda: NoiseSchedule.linear(10.0), TypeError, "T must be an int"),
    (lambda: NoiseSchedule.sigmoid('1000'), TypeError, "T must be an int"),
    (lambda: NoiseSchedule.cosine(True), TypeError, "T must be an int"),
    (lambda: NoiseSchedule.linear(10, beta_start=0.0), ValueError, "beta_start must be a number in the open interval (0, 1)"),
    (lambda: NoiseSchedule.linear(10, beta_end=1.0), ValueError, "beta_end must be a number in the open interval (0, 1)"),
    (lambda: NoiseSchedule.cosine(10, max_beta=1.0), ValueError, "max_beta must be a number in the open interval (0, 1)"),
    (lambda: NoiseSchedule.cosine(10, s=-0.1), ValueError, "s must be a number in [0, 1)"),
    (lambda: NoiseSchedule.sigmoid(10, steepness=0), ValueError, "steepness must be a positive number"),
    (lambda: NoiseSchedule([0.1, 1.0]), ValueError, "betas must lie in the open interval (0, 1); got betas[1] = 1.0"),
    (lambda: NoiseSchedule([0.1, -0.2]), ValueError, "got betas[1] = -0.2"),
    (lambda: NoiseSchedule([0.1, 0.0]), ValueError, "got betas[1] = 0.0"),
    (lambda: NoiseSchedule([0.1, float('nan')]), ValueError, "betas must be finite; got betas[1] = nan"),
    (lambda: NoiseSchedule(torch.tensor([float('inf')])), ValueError, "betas must be finite"),
    (lambda: NoiseSchedule([]), ValueError, "betas must hold at least one value"),
    (lambda: NoiseSchedule('abc'), TypeError, "betas must be a sequence of numbers"),
])
def test_bad_schedule_inputs(call, err, msg):
    with pytest.raises(err) as e: call()
    assert msg in str(e.value)


S = NoiseSchedule.linear(100)
X = torch.zeros(4, 1, 2, 2)

@pytest.mark.parametrize('call,err,msg', [
    (lambda: S.add_noise(X, torch.zeros_like(X), 100), ValueError, "t must lie in [0, 99] for a schedule with T=100; got values from 100 to 100"),
    (lambda: S.add_noise(X, torch.zeros_like(X), -1), ValueError, "t must lie in [0, 99]"),
    (lambda: S.add_noise(X, torch.zeros_like(X), torch.tensor([0, 5, 200, 1])), ValueError, "got values from 0 to 200"),
    (lambda: S.add_noise(X, torch.zeros_like(X), 5.0), TypeError, "t must hold integer timesteps; got dtype torch.float32"),
    (lambda: S.add_noise(X, torch.zeros_like(X), torch.tensor([1., 2, 3, 4])), TypeError, "integer timesteps"),
    (lambda: S.add_noise(X, torch.zeros_like(X), torch.tensor([True] * 4)), TypeError, "integer timesteps"),
    (lambda: S.add_noise(X, torch.zeros_like(X), 'ten'), TypeError, "t must be integer timesteps"),
    (lambda: S.add_noise(X, torch.zeros_like(X), torch.tensor([1, 2])), ValueError, "x0 has batch 4, t has 2"),
    (lambda: S.add_noise(X, torch.zeros_like(X), torch.zeros(4, 1, dtype=torch.long)), ValueError, "t must be a 1-D tensor"),
    (lambda: S.add_noise(X, torch.zeros(4, 1, 2, 3), 5), ValueError, "noise must have the shape of x0: x0 (4, 1, 2, 2), noise (4, 1, 2, 3)"),
    (lambda: S.add_noise(X, torch.zeros(2, 1, 2, 2), 5), ValueError, "noise must have the shape of x0"),
    (lambda: S.add_noise(X.long(), torch.zeros_like(X), 5), TypeError, "x0 must be a floating-point tensor"),
    (lambda: S.add_noise(X.numpy(), torch.zeros_like(X), 5), TypeError, "x0 and noise must be tensors"),
    (lambda: S.add_noise(torch.tensor(1.), torch.tensor(1.), 5), ValueError, "x0 must have a batch dimension"),
    (lambda: S.forward_step(X, torch.zeros_like(X), 100), ValueError, "t must lie in [0, 99]"),
    (lambda: S.forward_step(X, torch.zeros(3), 1), ValueError, "noise must have the shape of x_prev"),
    (lambda: S.snr(100), ValueError, "t must lie in [0, 99]"),
    (lambda: S.log_snr(0.5), TypeError, "integer timesteps"),
])
def test_bad_call_inputs(call, err, msg):
    with pytest.raises(err) as e: call()
    assert msg in str(e.value)
