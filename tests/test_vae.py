"""The VAE of chapter 10: the KL against torch.distributions, shapes, the latent scale, a resumed adversarial run
against an uninterrupted one, a short training run against a fixed PSNR bar, and the shipped `fmnist-vae`."""
import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffcourse.core import seed_everything
from diffcourse.data import load_fashion_mnist, get_dataloader
from diffcourse.learner import Learner, CheckpointCB, MixedPrecisionCB, list_checkpoints
from diffcourse.metrics import load_classifier
from diffcourse.pretrained import load, save_pretrained
from diffcourse.vae import (kl_diag_gaussian, reparameterize, MLPVAE, ELBOLoss, ImageVAE, AutoencoderLoss, PerceptualLoss,
                            PatchDiscriminator, DiscriminatorCB, psnr, ssim, reconstruct, latent_scale, pca_reconstruct,
                            train_autoencoder, hinge_d_loss)


def test_kl_closed_form_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, 4, 7, 7, generator=g) * 2, torch.randn(6, 4, 7, 7, generator=g)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0., 1.)).flatten(1).sum(1)
    torch.testing.assert_close(kl_diag_gaussian(mu, logvar), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(kl_diag_gaussian(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))


def test_reparameterize_moments_and_gradient():
    mu, logvar = torch.tensor([2., -1.], requires_grad=True), torch.tensor([0., 2 * torch.log(torch.tensor(3.))], requires_grad=True)
    z = reparameterize(mu.expand(50000, 2), logvar.expand(50000, 2), torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0), mu.detach(), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1., 3.]), atol=0.05, rtol=0)
    z.mean().backward()
    torch.testing.assert_close(mu.grad, torch.full((2,), 0.5))


@pytest.mark.parametrize('channels, size, latent', [((32, 64, 64), 28, (4, 7, 7)), ((16, 32), 32, (4, 16, 16)), ((8, 16, 16, 16), 32, (4, 4, 4))])
def test_image_vae_shapes(channels, size, latent):
    m = ImageVAE(channels=channels, image_size=size)
    x = torch.rand(3, 1, size, size) * 2 - 1
    assert m.latent_shape == latent
    out = m(x)
    assert out.recon.shape == x.shape and out.mu.shape == (3, *latent) and out.logvar.shape == (3, *latent)
    z = m.encode(x)
    assert z.shape == (3, *latent) and m.decode(z).shape == x.shape
    m2 = ImageVAE(channels=channels, image_size=size, scale=4.0)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.encode(x), 4 * m.encode(x))                  # scale multiplies on the way in ...
    torch.testing.assert_close(m2.decode(m2.encode(x)), m.decode(m.encode(x)))  # ... and divides on the way out


def test_mlp_vae_plain_autoencoder_is_deterministic():
    m = MLPVAE(latent_dim=3, variational=False).train()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(m(x).z, m(x).z) and torch.equal(m(x).z, m.encode(x)[0])
    v = MLPVAE(latent_dim=3).train()
    assert not torch.equal(v(x).z, v(x).z)                                     # a VAE samples in training


def test_psnr_and_ssim():
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 1, 28, 28, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(5, 1, 28, 28, generator=g)).clamp(-1, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(a, b), 10 * torch.log10(4 / mse))
    theirs = torch.tensor([structural_similarity(x[0].numpy(), y[0].numpy(), data_range=2.0, win_size=7) for x, y in zip(a, b)])
    torch.testing.assert_close(ssim(a, b), theirs.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(ssim(a, a), torch.ones(5), atol=1e-5, rtol=0)


def test_pca_reconstruct_is_exact_with_all_components_and_improves_with_more():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(200, 1, 4, 4, generator=g), torch.randn(10, 1, 4, 4, generator=g)
    torch.testing.assert_close(pca_reconstruct(tr, te, 16), te, atol=1e-5, rtol=0)
    errs = [((pca_reconstruct(tr, te, k) - te) ** 2).mean().item() for k in (2, 8, 14)]
    assert errs[0] > errs[1] > errs[2]


def test_hinge_loss():
    assert hinge_d_loss(torch.full((4,), 2.), torch.full((4,), -2.)).item() == 0.    # confident and right: no loss
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.


def _gan_learner(tmp, steps_ckpt=None):
    seed_everything(0)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    dl = get_dataloader(x, batch_size=8, seed=0)
    m = ImageVAE(channels=(8, 16, 16))
    loss = AutoencoderLoss(perceptual=PerceptualLoss(load_classifier()), discriminator=PatchDiscriminator(channels=(8, 16)))
    cbs = [DiscriminatorCB(start=2)] + ([CheckpointCB(tmp, every=steps_ckpt, keep=None)] if steps_ckpt else [])
    return Learner(m, dl, loss, lr=1e-3, cbs=cbs), loss


def test_adversarial_run_resumed_equals_uninterrupted(tmp_path):
    "The discriminator's weights and optimizer travel in the checkpoint: a resumed run ends bit for bit where the uninterrupted one does."
    a, la = _gan_learner(tmp_path/'a', steps_ckpt=3)
    a.fit(steps=6)
    assert 'd' in la.last and 'adv_lambda' in la.last                        # the adversarial part did run
    ck = [c for c in list_checkpoints(tmp_path/'a') if c.name == 'step-00000003'][0]
    b, lb = _gan_learner(tmp_path/'b')
    b.resume(ck, steps=6)
    for k, v in a.model.state_dict().items(): assert torch.equal(v, b.model.state_dict()[k]), k
    for k, v in la.discriminator.state_dict().items(): assert torch.equal(v, lb.discriminator.state_dict()[k]), k
    c, lc = _gan_learner(tmp_path/'c')                                          # and the check bites: no resume, other weights
    c.fit(steps=3)
    assert not all(torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_short_training_beats_a_psnr_bar():
    "60 steps of the MSE recipe on 3,000 images: held-out PSNR above 15 dB (untrained: about 5 dB)."
    torch.set_num_threads(1)
    tr, te = load_fashion_mnist('train', n=3000), load_fashion_mnist('test', n=300)
    before = psnr(reconstruct(ImageVAE(channels=(16, 32, 32)), te.images), te.images).mean().item()
    seed_everything(0)
    m, losses = train_autoencoder(ImageVAE(channels=(16, 32, 32)), tr, AutoencoderLoss(rec='mse'), 60, batch_size=64, lr=1e-3)
    after = psnr(reconstruct(m, te.images), te.images).mean().item()
    assert before < 10 and after > 15, (before, after)


@pytest.fixture(scope='module')
def shipped():
    return load('fmnist-vae')


def test_shipped_vae_card_and_scale(shipped):
    card = shipped.card
    assert card['kind'] == 'vae' and shipped.schedule is None
    assert shipped.model.scale == pytest.approx(card['latent']['scale'])
    assert card['measured']['psnr'] > 20 and card['command'].startswith('python tools/train_vae.py')
    te = load_fashion_mnist('test')
    z = shipped.encode(te.images[:2000])
    assert z.shape == (2000, 4, 7, 7)
    assert abs(z.std().item() - 1) < 0.1                                       # unit variance on held-out images
    scale, _ = latent_scale(shipped.model, load_fashion_mnist('train', n=5000).images)
    assert scale == pytest.approx(card['latent']['scale'], rel=0.05)           # the card's scale is 1/std of training latents
    rec = shipped.decode(shipped.encode(te.images[:500]))
    assert psnr(rec.clamp(-1, 1), te.images[:500]).mean().item() > card['measured']['psnr'] - 1
    with pytest.raises(ValueError, match='cannot sample'): shipped.sample(2)


def test_vae_card_roundtrip_without_schedule(tmp_path):
    m = ImageVAE(channels=(8, 16, 16), scale=0.5)
    card = {'kind': 'vae', 'model': {'module': 'diffcourse.vae', 'class': 'ImageVAE', 'kwargs': {'channels': [8, 16, 16], 'scale': 0.5}},
            'data': {'image_shape': [1, 28, 28]}}
    save_pretrained(m, card, 'tiny-vae', folder=tmp_path)
    pre = load('tiny-vae', folder=tmp_path)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert pre.model.scale == 0.5
    torch.testing.assert_close(pre.encode(x), m.half().float().encode(x), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="card must hold 'schedule'"):
        save_pretrained(m, dict(card, kind='ddpm'), 'x', folder=tmp_path)
