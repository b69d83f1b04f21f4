"Latent diffusion (chapter 11, `diffcourse.latent`): encoding and caching latents, latent models in cards, `diffcourse_train --vae`."
import json, shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffcourse import pretrained, cli
from diffcourse import latent as L
from diffcourse.latent import encode_images, load_latents, vae_entry, ConditionalMLPDenoiser
from diffcourse.pretrained import save_pretrained, WEIGHTS_DIR
from diffcourse.data import load_fashion_mnist
from diffcourse.ddpm import DiffusionLoss, ddpm_sample
from diffcourse.learner import Learner, MetricsCB
from diffcourse.schedules import NoiseSchedule
from diffcourse.unet import ResUNet
from diffcourse.vae import ImageVAE


@pytest.fixture(scope='module')
def vae(): return pretrained.load('fmnist-vae')

@pytest.fixture
def cache(tmp_path, monkeypatch):
    "Latents are cached in a temporary folder, never in the user's."
    monkeypatch.setenv('DIFFCOURSE_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache' / 'latents'


def test_encode_images_is_the_vaes_encode_in_batches(vae):
    x = load_fashion_mnist('test', n=7).images
    z = encode_images(vae, x, batch_size=3)
    assert z.shape == (7, 4, 7, 7) and z.dtype == torch.float32
    torch.testing.assert_close(z, vae.model.encode(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(encode_images(vae.model, x), z, rtol=0, atol=1e-5)        # the module itself works too


def test_load_latents_caches_and_never_trusts_a_stale_or_damaged_cache(vae, cache, monkeypatch):
    d = load_latents(vae, 'fmnist', 'test', n=40, progress=False)
    assert d.images.shape == (40, 4, 7, 7) and d.labels.shape == (40,) and len(d.classes) == 10
    files = list(cache.glob('*.safetensors'))
    assert len(files) == 1 and vae.card['sha256'][:12] in files[0].name
    fresh = d.images.clone()
    real_encode = L.encode_images
    def refuse(*a, **k): raise AssertionError("encoded again although the cache was good")
    monkeypatch.setattr(L, 'encode_images', refuse)
    again = load_latents(vae, 'fmnist', 'test', n=40)                  # read from the cache, not encoded
    assert torch.equal(again.images, fresh) and torch.equal(again.labels, d.labels) and again.classes == d.classes
    calls = []
    def counting(*a, **k): calls.append(1); return real_encode(*a, **k)
    monkeypatch.setattr(L, 'encode_images', counting)
    files[0].write_bytes(files[0].read_bytes()[:100])                # damaged: rebuilt
    assert torch.allclose(load_latents(vae, 'fmnist', 'test', n=40).images, fresh, atol=1e-5) and len(calls) == 1
    other = vae.__class__(vae.name, vae.model, None, {**vae.card, 'sha256': 'cd' * 32})   # another VAE of the same name
    load_latents(other, 'fmnist', 'test', n=40)
    assert len(calls) == 2 and len(list(cache.glob('*.safetensors'))) == 2   # its own cache file; the first is untouched
    load_latents(vae, 'fmnist', 'test', n=40, cache=False)
    assert len(calls) == 3


def test_scale_factor_gives_unit_variance_on_held_out_latents(vae):
    z = load_latents(vae, 'fmnist', 'test', n=2000, cache=False, progress=False).images
    assert 0.9 < z.std().item() < 1.1, z.std()


def tiny_ldm_folder(d:Path) -> Path:
    torch.manual_seed(0)
    save_pretrained(ImageVAE(channels=(8, 8, 8), head_dim=8, scale=0.5), {'kind': 'vae', 'data': {'image_shape': [1, 28, 28]},
                    'model': {'module': 'diffcourse.vae', 'class': 'ImageVAE', 'kwargs': {'channels': [8, 8, 8], 'head_dim': 8, 'scale': 0.5}}}, 'v', folder=d)
    unet = ResUNet(in_channels=4, channels=(8,))
    nn.init.normal_(unet.out.weight, std=0.1)                         # not the zero init: the samples depend on the weights
    card = {'model': {'module': 'diffcourse.unet', 'class': 'ResUNet', 'kwargs': {'in_channels': 4, 'channels': [8]}},
            'schedule': {'name': 'cosine', 'T': 50}, 'data': {'image_shape': [1, 28, 28], 'latent_shape': [4, 7, 7]},
            'vae': vae_entry(pretrained.load('v', folder=d)), 'sampling': {'sampler': 'ddim', 'steps': 5, 'clip_sample': None}}
    save_pretrained(unet, card, 'ldm', folder=d)
    return d


def test_a_latent_model_loads_its_vae_and_samples_decoded_images(tmp_path):
    d = tiny_ldm_folder(tmp_path)
    ldm = pretrained.load('ldm', folder=d)
    assert ldm.vae is not None and ldm.vae.name == 'v' and ldm.latent_shape == (4, 7, 7) and ldm.image_shape == (1, 28, 28)
    z = ldm.sample(3, seed=1, decode=False)
    assert z.shape == (3, 4, 7, 7)
    x = ldm.sample(3, seed=1)
    assert x.shape == (3, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, ldm.vae.model.decode(z).clamp(-1, 1))          # the same latents, decoded and clamped
    torch.testing.assert_close(ldm.decode(z), ldm.vae.decode(z))                  # a latent model decodes with its VAE
    assert pretrained.load('v', folder=d).latent_shape is None and pretrained.load('v', folder=d).vae is None


def test_the_shipped_latent_model_samples_images():
    if 'fmnist-ldm' not in pretrained.available(): pytest.fail("fmnist-ldm is not shipped")
    ldm = pretrained.load('fmnist-ldm')
    assert ldm.card['vae']['name'] == 'fmnist-vae' and ldm.card['vae']['sha256'] == pretrained.load('fmnist-vae').card['sha256']
    x = ldm.sample(4)
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.3                                               # garments on a black background, not a flat grey


def test_train_export_and_sample_on_latents(tmp_path, cache, vae):
    run = tmp_path / 'run'
    res = cli.train_command(model='res', channels='16', vae='fmnist-vae', steps=3, n_data=64, batch_size=8, out=str(run),
                            speed='fp32', progress=False, n_samples=4, sample_steps=5)
    assert res['steps'] == 3 and (run / 'samples.png').is_file()
    from PIL import Image
    assert Image.open(run / 'samples.png').size[0] > 2 * 2 * 28                 # a 2x2 grid of decoded 28x28 images, not 7x7 latents
    rec = json.loads((Path(res['checkpoint']) / 'state.json').read_text())['config']['diffcourse']
    assert rec['vae'] == vae_entry(vae) and rec['data']['latent_shape'] == [4, 7, 7] and rec['data']['image_shape'] == [1, 28, 28]
    assert rec['sampling'] == {'clip_sample': None} and '--vae fmnist-vae' in rec['command']
    w = tmp_path / 'w'
    cli.export_command(str(run), name='my-ldm', folder=str(w))
    for f in ('fmnist-vae.safetensors', 'fmnist-vae.json'): shutil.copy(WEIGHTS_DIR / f, w / f)
    ldm = pretrained.load('my-ldm', folder=w)
    assert ldm.card['vae'] == vae_entry(vae) and ldm.sampling['clip_sample'] is None
    assert ldm.sample(2, steps=3, sampler='ddim').shape == (2, 1, 28, 28)
    png = cli.sample_command(str(run), n=2, steps=3, sampler='ddim', out=str(tmp_path / 'g.png'), progress=False)
    assert Image.open(png).size[0] > 2 * 28


def test_conditional_mlp_denoiser_follows_its_label():
    "Two clusters, labelled 0 and 1: samples asked for label 1 land at cluster 1, and for label 0 at cluster 0."
    torch.manual_seed(0)
    centres = torch.tensor([[-2., 0.], [2., 0.]])
    y = torch.randint(0, 2, (2048,))
    x = centres[y] + 0.2 * torch.randn(2048, 2)
    sched = NoiseSchedule.cosine(100)
    model = ConditionalMLPDenoiser(num_classes=2, hidden=64, n_layers=2)
    learn = Learner(model, DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True), DiffusionLoss(sched, conditional=True),
                    lr=3e-3, cbs=[MetricsCB(printer=None)]).fit(steps=400)
    model.eval()
    labels = torch.tensor([0, 1] * 50)
    with torch.no_grad(): out = ddpm_sample(model, sched, torch.randn(100, 2, generator=torch.Generator().manual_seed(1)),
                                            generator=torch.Generator().manual_seed(2), labels=labels)
    near = (out - centres[labels]).norm(dim=1)
    assert (near < 1.0).float().mean() > 0.9, near
