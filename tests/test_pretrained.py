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
