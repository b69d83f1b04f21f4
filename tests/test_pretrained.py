"Shipped weights load by name, offline, without pickle; bad names and damaged files say what is wrong."
import json, hashlib
import pytest, torch
from torch import nn
from diffcourse import pretrained
from diffcourse.pretrained import load, available, save_pretrained, ddpm_timesteps, generate, build_model, WEIGHTS_DIR
from diffcourse.schedules import NoiseSchedule

def test_shipped_model_listed_and_declared():
    assert 'fmnist-ddpm' in available()
    card = json.loads((WEIGHTS_DIR/'fmnist-ddpm.json').read_text())
    for k in ('model', 'schedule', 'training', 'command', 'sha256'): assert k in card
    assert card['command'].startswith('diffcourse_train ')
    assert {'channels', 'attention', 'num_res', 'time_emb_dim'} <= set(card['model']['kwargs'])   # every UNet argument, not defaults
    assert (WEIGHTS_DIR/'fmnist-ddpm.safetensors').stat().st_size <= 5 * 2**20

def test_load_offline_without_pickle(offline_no_pickle):
    pre = load('fmnist-ddpm')
    assert not pre.model.training and all(not p.requires_grad for p in pre.model.parameters())
    assert isinstance(pre.schedule, NoiseSchedule) and pre.schedule.T == pre.card['schedule']['T']
    assert next(pre.model.parameters()).dtype == torch.float32
    x = pre.sample(n=2, steps=4, seed=0)
    assert x.shape == (2, *pre.image_shape) and torch.isfinite(x).all()
    assert torch.equal(x, pre.sample(n=2, steps=4, seed=0))      # seeded

def test_shipped_model_predicts_noise():
    "The trained model predicts the noise much better than predicting zero (loss 1) at mid-range t."
    from diffcourse.data import load_fashion_mnist
    pre = load('fmnist-ddpm')
    data = load_fashion_mnist('test', n=64)
    x0 = data.images
    if tuple(x0.shape[1:]) != pre.image_shape:
        from diffcourse.data import pad_images
        x0 = pad_images(x0, pre.image_shape[-1])
    g = torch.Generator().manual_seed(0)
    t = torch.randint(100, 900, (len(x0),), generator=g); eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad(): loss = ((pre.model(pre.schedule.add_noise(x0, eps, t), t) - eps) ** 2).mean()
    assert loss < 0.2, loss

def test_unknown_name_lists_names():
    with pytest.raises(ValueError) as e: load('no-such')
    assert "no-such" in str(e.value) and 'fmnist-ddpm' in str(e.value)

class Tiny(nn.Module):
    def __init__(self, width=4): super().__init__(); self.conv = nn.Conv2d(1, 1, 3, padding=1); self.width = width
    def forward(self, x, t): return self.conv(x)

@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    import diffcourse
    monkeypatch.setattr(diffcourse, 'Tiny', Tiny, raising=False)
    card = {'model': {'module': 'diffcourse', 'class': 'Tiny', 'kwargs': {'width': 3}}, 'schedule': {'name': 'linear', 'T': 20},
            'data': {'image_shape': [1, 8, 8]}}
    m = Tiny()
    save_pretrained(m, card, 'tiny', folder=tmp_path)
    return tmp_path, m

def test_roundtrip_fp16(tiny_dir):
    d, m = tiny_dir
    assert available(d) == ['tiny'] and not list(d.glob('.*tmp*'))
    p = load('tiny', folder=d)
    assert p.model.width == 3
    torch.testing.assert_close(p.model.conv.weight, m.conv.weight.half().float())

def test_damaged_file_detected(tiny_dir):
    d, _ = tiny_dir
    f = d/'tiny.safetensors'
    b = bytearray(f.read_bytes()); b[-1] ^= 1; f.write_bytes(bytes(b))
    with pytest.raises(ValueError, match='SHA-256'): load('tiny', folder=d)

def test_card_cannot_name_other_code():
    with pytest.raises(ValueError, match='only name classes of diffcourse'): build_model({'module': 'subprocess', 'class': 'Popen'})

def test_save_checks(tmp_path):
    with pytest.raises(ValueError, match='must hold'): save_pretrained(Tiny(), {'model': {}}, 'x', folder=tmp_path)
    with pytest.raises(ValueError, match='name must be'): save_pretrained(Tiny(), {'model': {}, 'schedule': {}}, '../evil', folder=tmp_path)
    big = nn.Linear(2000, 2000)
    with pytest.raises(ValueError, match='max_mb'):
        save_pretrained(big, {'model': {}, 'schedule': {'name': 'linear', 'T': 10}}, 'big', folder=tmp_path, max_mb=1)

def test_ddpm_timesteps_match_diffusers():
    from diffusers import DDPMScheduler
    s = DDPMScheduler(num_train_timesteps=1000); s.set_timesteps(50)
    assert ddpm_timesteps(1000, 50) == s.timesteps.tolist()

def test_generate_matches_full_ddpm_sample():
    "With all T steps, `generate` is `ddpm_sample` with the same noise."
    from diffcourse.ddpm import ddpm_sample, MLPDenoiser
    torch.manual_seed(0)
    class M(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.tensor(0.3))
        def forward(self, x, t): return self.w * x + t.float()[:, None, None, None] / 100
    sched = NoiseSchedule.linear(T=10)
    m = M()
    a = generate(m, sched, 3, (1, 2, 2), seed=1, clip_sample=None)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 2, 2, generator=g)
    b = ddpm_sample(m, sched, x, generator=g)
    torch.testing.assert_close(a, b)

def old_generate(model, sched, n, image_shape, steps=None, seed=0, clip_sample=1.0):
    "`generate` as it was before it went through `samplers.sample`: ancestral DDPM, one generator for the start and every step."
    from diffcourse.ddpm import ddpm_step
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *image_shape), generator=g)
    ts = ddpm_timesteps(sched.T, steps)
    for i, t in enumerate(ts):
        noise = torch.randn(x.shape, generator=g)
        x, _ = ddpm_step(model, sched, x, t, noise=noise, prev_t=ts[i + 1] if i + 1 < len(ts) else -1, clip_sample=clip_sample)
    return x

def test_generate_is_unchanged_ddpm_by_default():
    "Through `samplers.sample` with sampler='ddpm', `generate` gives the very images it gave with its own loop."
    pre = load('fmnist-ddpm')
    for steps, clip in ((3, 1.0), (7, None)):
        assert torch.equal(generate(pre.model, pre.schedule, 2, pre.image_shape, steps=steps, seed=4, clip_sample=clip),
                           old_generate(pre.model, pre.schedule, 2, pre.image_shape, steps=steps, seed=4, clip_sample=clip))
    if 'sampling' not in pre.card:                                     # no entry: the card keeps DDPM
        assert torch.equal(pre.sample(n=2, steps=3, seed=4), old_generate(pre.model, pre.schedule, 2, pre.image_shape, steps=3, seed=4))

def test_generate_with_other_samplers_and_a_progress_bar():
    from diffcourse.samplers import sample
    pre = load('fmnist-ddpm')
    seen = []
    a = generate(pre.model, pre.schedule, 2, pre.image_shape, steps=4, seed=1, sampler='heun', spacing='karras', sigma_max=80.0,
                 callback=lambda i, t, x, x0: seen.append(i), progress=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *pre.image_shape), generator=g)
    assert torch.equal(a, sample(pre.model, pre.schedule, x, sampler='heun', steps=4, spacing='karras', sigma_max=80.0, clip_sample=1.0, generator=g))
    assert seen == [0, 1, 2, 3]

SAMPLING = {'sampler': 'dpmpp_2m', 'steps': 5, 'spacing': 'trailing', 'clip_sample': 1.0}

@pytest.fixture
def tiny_sampling_dir(tmp_path, monkeypatch):
    import diffcourse
    monkeypatch.setattr(diffcourse, 'Tiny', Tiny, raising=False)
    card = {'model': {'module': 'diffcourse', 'class': 'Tiny', 'kwargs': {'width': 3}}, 'schedule': {'name': 'cosine', 'T': 50},
            'data': {'image_shape': [1, 8, 8]}, 'sampling': SAMPLING}
    save_pretrained(Tiny(), card, 'tiny', folder=tmp_path)
    return tmp_path

def test_card_sampling_is_the_default_and_each_part_can_be_overridden(tiny_sampling_dir):
    p = load('tiny', folder=tiny_sampling_dir)
    assert p.card['sampling'] == SAMPLING and p.sampling == {**SAMPLING, 'eta': 0.0}
    gen = lambda **kw: generate(p.model, p.schedule, 3, (1, 8, 8), seed=2, **kw)
    assert torch.equal(p.sample(n=3, seed=2), gen(sampler='dpmpp_2m', steps=5, spacing='trailing'))
    assert torch.equal(p.sample(n=3, seed=2, steps=8), gen(sampler='dpmpp_2m', steps=8, spacing='trailing'))
    assert torch.equal(p.sample(n=3, seed=2, spacing='karras'), gen(sampler='dpmpp_2m', steps=5, spacing='karras'))
    with pytest.warns(UserWarning, match='clip_sample=1.0'):              # cosine T=50 from t=49, unclipped: 1/sqrt(ᾱ) = 1,015
        a, b = p.sample(n=3, seed=2, clip_sample=False), gen(sampler='dpmpp_2m', steps=5, spacing='trailing', clip_sample=None)
    assert torch.equal(a, b)
    # another sampler: the card's recipe is dropped (its clip_sample kept), so DDIM gets its own defaults
    assert torch.equal(p.sample(n=3, seed=2, sampler='ddim', eta=0.5, steps=6), gen(sampler='ddim', eta=0.5, steps=6))
    assert torch.equal(p.sample(n=3, seed=2, sampler='ddpm'), gen())                        # all 50 steps, DDPM, clipped

def test_card_without_sampling_keeps_ddpm(tiny_dir):
    d, _ = tiny_dir
    p = load('tiny', folder=d)
    assert 'sampling' not in p.card and p.sampling['sampler'] == 'ddpm'
    assert torch.equal(p.sample(n=2, steps=5, seed=3), old_generate(p.model, p.schedule, 2, (1, 8, 8), steps=5, seed=3))
    assert torch.equal(p.sample(n=2, seed=3), old_generate(p.model, p.schedule, 2, (1, 8, 8), seed=3))         # all T = 20 steps
    assert torch.equal(p.sample(n=2, steps=5, seed=3, sampler='dpmpp_2m', spacing='trailing'),
                       generate(p.model, p.schedule, 2, (1, 8, 8), steps=5, seed=3, sampler='dpmpp_2m', spacing='trailing'))

@pytest.mark.parametrize('entry, msg', [
    ({'sampler': 'plms'}, "sampler must be one of"),
    ({'sampler': 'ddim', 'spacing': 'karras'}, "spacing='karras'"),
    ({'sampler': 'euler', 'steps': 0}, "steps must be an int from 1 to 50"),
    ({'sampler': 'euler', 'eta': 0.5}, "eta applies to sampler='ddim' only"),
    ({'clip_sample': -1}, "clip_sample must be a positive number or None"),
    ({'steps': 5, 'guidance_scale': 3}, "keys from"),
    (['dpmpp_2m'], "must be a dict"),
])
def test_bad_sampling_entry_refused_at_save_and_at_load(tiny_sampling_dir, entry, msg, tmp_path):
    import diffcourse
    card = {'model': {'module': 'diffcourse', 'class': 'Tiny', 'kwargs': {'width': 3}}, 'schedule': {'name': 'cosine', 'T': 50},
            'data': {'image_shape': [1, 8, 8]}, 'sampling': entry}
    with pytest.raises(ValueError, match="'sampling' entry") as e: save_pretrained(Tiny(), card, 'bad', folder=tmp_path / 'w')
    assert msg in str(e.value)
    f = tiny_sampling_dir / 'tiny.json'                      # a card edited by hand: refused when loaded, left as it is
    c = json.loads(f.read_text()); c['sampling'] = entry; f.write_text(json.dumps(c))
    before = f.read_bytes()
    with pytest.raises(ValueError, match=r"tiny\.json: its 'sampling' entry") as e: load('tiny', folder=tiny_sampling_dir)
    assert msg in str(e.value) and f.read_bytes() == before
