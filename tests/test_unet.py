import math
import pytest, torch
import torch.nn.functional as F
from diffcourse.unet import (UNet, ConvUNet, ResUNet, ResAttnUNet, ResBlock, SelfAttention, DownBlock, UpBlock,
                             TimeEmbedding, count_params)
from diffcourse.ddpm import timestep_embedding

torch.set_num_threads(1)
PRESETS = [ConvUNet, ResUNet, ResAttnUNet]
TINY = dict(channels=(4, 8, 8), time_emb_dim=16, head_dim=4, norm_groups=4)


def nudge(model, scale=0.02, seed=0):
    "Move every weight off its initial value, as a little training would (zero-initialised layers included)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope='module')
def tiny_models():
    torch.manual_seed(0)
    return {(P, cond): P(in_channels=3, num_classes=10 if cond else None, **TINY) for P in PRESETS for cond in (False, True)}


@pytest.mark.parametrize('P', PRESETS, ids=lambda P: P.__name__)
@pytest.mark.parametrize('cond', [False, True], ids=['uncond', 'labels'])
@pytest.mark.parametrize('size', [28, 32, 64])
def test_shape_matrix(tiny_models, P, cond, size):
    m = tiny_models[(P, cond)]
    x, t = torch.randn(2, 3, size, size), torch.tensor([0, 999])
    with torch.no_grad(): y = m(x, t, labels=torch.tensor([3, 9]) if cond else None)
    assert y.shape == x.shape and y.dtype == x.dtype
    if cond:
        with torch.no_grad(): assert m(x, t).shape == x.shape       # labels=None: the "no label" class


def test_presets_are_unets_with_their_blocks():
    for P, residual, attn in [(ConvUNet, False, (False,) * 3), (ResUNet, True, (False,) * 3), (ResAttnUNet, True, (False, False, True))]:
        m = P()
        assert isinstance(m, UNet) and m.config['residual'] is residual and m.config['attention'] == attn
        assert any(isinstance(x, SelfAttention) for x in m.modules()) == any(attn)
        assert all(b.residual is residual for b in m.modules() if isinstance(b, ResBlock))
    # a config rebuilds the same architecture
    m = ResAttnUNet(num_classes=10)
    assert count_params(UNet(**m.config)) == count_params(m)


def test_param_counts():
    assert {P.__name__: count_params(P()) for P in PRESETS} == {'ConvUNet': 1_674_497, 'ResUNet': 1_733_281, 'ResAttnUNet': 1_932_193}
    assert count_params(ResAttnUNet(num_classes=10)) - count_params(ResAttnUNet()) == 11 * 128   # 10 classes + "no label"
    assert count_params(ResAttnUNet(in_channels=3)) > count_params(ResAttnUNet(in_channels=1))


def test_28x28_three_levels_and_four_levels():
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    m3 = UNet(**TINY | dict(channels=(4, 8, 8)))
    assert m3.size_multiple == 4 and m3(x, t).shape == x.shape
    m4 = UNet(**TINY | dict(channels=(4, 8, 8, 8)))
    assert m4.size_multiple == 8 and m4(torch.randn(2, 1, 32, 32), t).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"x is 28x28.*4 levels.*multiples of 8.*24 or 32"): m4(x, t)


@pytest.mark.parametrize('call, exc, msg', [
    (lambda m, x, t: m(torch.randn(2, 1, 30, 30), t), ValueError, r"x is 30x30, but a UNet with 3 levels halves the size 2 times.*multiples of 4; pad or crop 30 to 28 or 32"),
    (lambda m, x, t: m(torch.randn(2, 1, 28, 30), t), ValueError, r"x is 28x30"),
    (lambda m, x, t: m(torch.randn(2, 3, 28, 28), t), ValueError, r"x has 3 channels but this UNet was built with in_channels=1"),
    (lambda m, x, t: m(torch.randn(1, 28, 28), t), ValueError, r"x must be a batch of images \(B, C, H, W\); got shape \(1, 28, 28\)"),
    (lambda m, x, t: m(torch.randn(1, 2, 1, 28, 28), t), ValueError, r"\(B, C, H, W\); got shape \(1, 2, 1, 28, 28\)"),
    (lambda m, x, t: m(x.long(), t), TypeError, r"x must be a floating-point tensor"),
    (lambda m, x, t: m(x, torch.tensor(5)), ValueError, r"t must have shape \(B,\) = \(2,\).*got \(\)"),
    (lambda m, x, t: m(x, t[:, None]), ValueError, r"t must have shape \(B,\) = \(2,\).*got \(2, 1\)"),
    (lambda m, x, t: m(x, torch.tensor([1, 2, 3])), ValueError, r"got \(3,\)"),
    (lambda m, x, t: m(x, [1, 2]), TypeError, r"t must be a tensor of timesteps"),
    (lambda m, x, t: m(x, t, labels=torch.tensor([1, 2])), ValueError, r"labels were given.*no class embedding; build it with num_classes"),
])
def test_input_errors(call, exc, msg):
    m, x, t = UNet(**TINY), torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(exc, match=msg): call(m, x, t)


def test_label_errors():
    m, x, t = UNet(num_classes=10, **TINY), torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\] \(or 10 for no label\) for num_classes=10; got values from 3 to 11"):
        m(x, t, labels=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match=r"got values from -1 to 3"): m(x, t, labels=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) = \(2,\)"): m(x, t, labels=torch.tensor([3]))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"): m(x, t, labels=torch.tensor([1., 2.]))
    assert m(x, t, labels=torch.tensor([0, 10])).shape == x.shape     # 10 is "no label"


@pytest.mark.parametrize('kw, msg', [
    (dict(channels=()), "channels must be a non-empty sequence"),
    (dict(channels=(32, 0)), "channels must be"),
    (dict(channels=32), "channels must be"),
    (dict(attention=(True, False)), r"one bool per level \(3 levels\)"),
    (dict(num_res=0), "num_res must be a positive int"),
    (dict(neck_length=-1), "neck_length must be an int >= 0"),
    (dict(in_channels=0), "in_channels must be a positive int"),
    (dict(num_classes=0), "num_classes must be a positive int or None"),
    (dict(channels=(32, 100), attention=True), "divisible by the number of heads"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg): UNet(**kw)


def test_float_timesteps_and_batch_one():
    m = nudge(UNet(**TINY))
    x = torch.randn(1, 1, 32, 32)
    y_int, y_float = m(x, torch.tensor([10])), m(x, torch.tensor([10.]))
    torch.testing.assert_close(y_int, y_float)       # same embedding for integer and float t
    assert m(x, torch.tensor([10.5])).shape == x.shape


def test_init_is_deterministic_under_a_seed():
    torch.manual_seed(3); a = ResAttnUNet(num_classes=10, **TINY)
    torch.manual_seed(3); b = ResAttnUNet(num_classes=10, **TINY)
    torch.manual_seed(4); c = ResAttnUNet(num_classes=10, **TINY)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_zero_init_blocks_start_as_identity():
    m = ResAttnUNet(**TINY)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    assert m(x, t).abs().max() == 0                                      # output conv starts at zero: eps_hat = 0
    x = torch.randn(2, 8, 7, 7)
    assert torch.equal(ResBlock(8, 8, 16)(x, torch.randn(2, 16)), x)    # residual block = its skip path
    assert torch.equal(SelfAttention(8, head_dim=4)(x), x)              # attention = identity
    assert not torch.equal(ResBlock(8, 8, 16, residual=False)(x, torch.randn(2, 16)), x)


@pytest.mark.parametrize('P', PRESETS, ids=lambda P: P.__name__)
def test_gradients_reach_every_parameter(P):
    "Zero-initialised layers block gradients at step 0 only: after a few optimiser steps every parameter gets one."
    torch.manual_seed(0)
    m = P(num_classes=10, **TINY)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, t, y = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 10])
    for _ in range(4):
        opt.zero_grad(); F.mse_loss(m(x, t, labels=y), torch.randn_like(x)).backward(); opt.step()
    opt.zero_grad(); F.mse_loss(m(x, t, labels=y), torch.randn_like(x)).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient for {dead}"


def test_labels_change_the_output():
    m = nudge(ResAttnUNet(num_classes=10, **TINY))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 500])
    with torch.no_grad():
        y0, y7, y_none = m(x, t, labels=torch.tensor([0, 0])), m(x, t, labels=torch.tensor([7, 7])), m(x, t)
        assert (y0 - y7).abs().mean() > 1e-4 and (y0 - y_none).abs().mean() > 1e-4
        torch.testing.assert_close(y_none, m(x, t, labels=torch.tensor([10, 10])))
        # each image's prediction depends on its own label only
        mixed = m(x, t, labels=torch.tensor([0, 7]))
        torch.testing.assert_close(mixed[0], y0[0]); torch.testing.assert_close(mixed[1], y7[1])


def test_timestep_changes_the_output_and_batch_independence():
    m = nudge(ResUNet(**TINY)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = m(x, torch.tensor([5, 5, 900]))
        assert (y[0] - m(x[:1], torch.tensor([900]))[0]).abs().mean() > 1e-4
        torch.testing.assert_close(y[2:], m(x[2:], torch.tensor([900])))    # GroupNorm: no mixing across the batch


def test_attention_matches_manual_and_is_pixel_equivariant():
    torch.manual_seed(0)
    a = nudge(SelfAttention(16, head_dim=4), scale=0.1)
    x = torch.randn(2, 16, 5, 6)
    B, C, H, W = x.shape
    h = a.norm(x).flatten(2).transpose(1, 2)
    q, k, v = (z.view(B, H * W, a.heads, -1).transpose(1, 2) for z in a.qkv(h).chunk(3, -1))
    w = (q @ k.transpose(-1, -2) / math.sqrt(C // a.heads)).softmax(-1)
    ref = x + a.proj((w @ v).transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)
    with torch.no_grad():
        torch.testing.assert_close(a(x), ref, atol=1e-5, rtol=1e-5)
        perm = torch.randperm(H * W)
        shuf = lambda z: z.flatten(2)[..., perm].reshape(z.shape)
        torch.testing.assert_close(a(shuf(x)), shuf(a(x)), atol=1e-5, rtol=1e-5)


def test_blocks_and_time_embedding_shapes():
    e = torch.randn(2, 16)
    h, skip = DownBlock(4, 8, 16, num_res=2, attention=True, norm_groups=4, head_dim=4)(torch.randn(2, 4, 14, 14), e)
    assert h.shape == (2, 8, 7, 7) and skip.shape == (2, 8, 14, 14)
    assert UpBlock(8, 8, 4, 16, num_res=2, norm_groups=4)(h, skip, e).shape == (2, 4, 14, 14)
    assert TimeEmbedding(16, sin_dim=8)(torch.tensor([0, 999])).shape == (2, 16)
    torch.testing.assert_close(timestep_embedding(torch.tensor([0.]), 4), torch.tensor([[1., 1., 0., 0.]]))


def test_learns_to_denoise_a_fixed_batch():
    "A few steps on one batch: the loss of the zero-initialised model starts at E[eps^2] ~ 1 and falls."
    torch.manual_seed(0)
    m = ResAttnUNet(channels=(8, 16, 16), time_emb_dim=32, head_dim=8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x0 = torch.zeros(8, 1, 16, 16); x0[:, :, 4:12, 4:12] = 1
    noise, t = torch.randn_like(x0), torch.randint(0, 1000, (8,))
    ab = torch.linspace(0.99, 0.05, 1000)[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    losses = []
    for _ in range(30):
        loss = F.mse_loss(m(xt, t), noise); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert abs(losses[0] - noise.pow(2).mean().item()) < 1e-6
    assert losses[-1] < 0.5 * losses[0]
