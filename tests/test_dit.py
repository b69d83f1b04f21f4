"The Diffusion Transformer (chapter 12, `diffcourse.dit`): against diffusers, the zero-init property, shapes of every variant, label dropout, use by the samplers."
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from diffcourse.dit import (DiT, DiTBlock, BLOCKS, DIT_SIZES, patchify, unpatchify, sincos_1d, sincos_2d, LabelEmbedder, Attention,
                            attention_maps, forward_flops, to_diffusers, modulate)
from diffcourse.pretrained import save_pretrained, load, WEIGHTS_DIR
from diffcourse.samplers import sample, SAMPLERS
from diffcourse.schedules import NoiseSchedule
from diffcourse.unet import count_params


def perturbed(m, scale=0.05, seed=0):
    "`m` with every weight moved off its initial value (zero-initialised layers would hide most of the network)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn(p.shape, generator=g) * scale)
    return m.eval()


def test_patchify_is_a_reshape_that_unpatchify_inverts():
    x = torch.randn(2, 3, 12, 8)
    tok = patchify(x, 4)
    assert tok.shape == (2, 6, 48)
    # token 4 is patch row 2, column 0; its features are (row, column, channel) within the patch
    torch.testing.assert_close(tok[1, 4].reshape(4, 4, 3), x[1, :, 8:12, 0:4].permute(1, 2, 0), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(tok, 4, 3, 12, 8), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="patch_size=5 does not divide the image size 12x8"): patchify(x, 5)
    with pytest.raises(ValueError, match=r"need \(2, 6, 48\)"): unpatchify(tok[:, :5], 4, 3, 12, 8)


def test_patch_embedding_conv_is_patchify_then_linear():
    m = DiT(in_channels=3, image_size=8, patch_size=4, size='T')
    x = torch.randn(2, 3, 8, 8)
    w = m.patch_embed.weight                                       # (D, C, p, p)
    lin = patchify(x, 4) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + m.patch_embed.bias
    torch.testing.assert_close(m.patch_embed(x).flatten(2).transpose(1, 2), lin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dim, g', [(96, 7), (128, 14), (64, 4), (8, 1)])
def test_sincos_positions_match_diffusers_and_the_closed_form(dim, g):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    ref = get_2d_sincos_pos_embed(dim, g, base_size=g, output_type='pt').float()
    torch.testing.assert_close(sincos_2d(dim, g, g), ref, rtol=0, atol=1e-6)
    pe = sincos_2d(dim, g, g)
    r, c = g - 1, 0                                                 # the last row, first column
    k = dim // 4
    om = 10000 ** (-torch.arange(k, dtype=torch.float64) / k)
    want = torch.cat([torch.sin(c * om), torch.cos(c * om), torch.sin(r * om), torch.cos(r * om)]).float()
    torch.testing.assert_close(pe[r * g + c], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"): sincos_2d(dim + 2, g, g)


def test_positions_are_more_alike_for_nearer_patches():
    pe = F.normalize(sincos_2d(128, 7, 7), dim=1)
    sim = (pe @ pe[24]).reshape(7, 7)                               # against the centre patch (3, 3)
    assert sim[3, 3] == pytest.approx(1.0)
    for d in range(3):                                              # along the row and along the column, similarity falls with distance
        assert sim[3, 3 + d] > sim[3, 4 + d] and sim[3 + d, 3] > sim[4 + d, 3]


@pytest.mark.parametrize('patch, size, C, depth', [(1, 7, 4, 2), (2, 8, 1, 3), (4, 8, 3, 1)])
def test_adaln_zero_matches_diffusers_dit(patch, size, C, depth):
    "Our adaLN-Zero DiT with its weights copied into diffusers' DiTTransformer2DModel gives the same noise prediction."
    torch.manual_seed(0)
    m = perturbed(DiT(in_channels=C, image_size=size, patch_size=patch, size='T', depth=depth, num_classes=10))
    ref = to_diffusers(m)
    x, t, y = torch.randn(4, C, size, size), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])   # 10: the null label
    with torch.no_grad():
        ours, theirs = m(x, t, labels=y), ref(x, t, class_labels=y).sample
    assert ours.abs().max() > 0.1                                   # a real output, not zero-init's zeros
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    # the test bites: diffusers' own timestep frequencies (shift 1) give another output
    for b in ref.transformer_blocks: b.norm1.emb.time_proj.downscale_freq_shift = 1
    with torch.no_grad(): assert (ref(x, t, class_labels=y).sample - ours).abs().max() > 1e-3


def test_to_diffusers_refuses_what_diffusers_cannot_express():
    for m in (DiT(size='T', block='adaln'), DiT(size='T')):        # another block; unconditional
        with pytest.raises(ValueError, match="to_diffusers needs a class-conditional adaLN-Zero DiT"): to_diffusers(m)


def test_untrained_adaln_zero_outputs_zero_and_every_block_is_the_identity():
    m = DiT(image_size=28, patch_size=4, size='XS', num_classes=10)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 400, 999])
    with torch.no_grad():
        assert torch.equal(m(x, t, labels=torch.tensor([1, 2, 10])), torch.zeros_like(x))
        h, c = torch.randn(3, m.num_tokens, 128), torch.randn(3, 128)
        for b in m.blocks: assert torch.equal(b(h, c), h)
    # the other blocks start as ordinary residual blocks (not the identity), but the zero output layer still gives 0
    for block in BLOCKS[1:]:
        o = DiT(image_size=28, patch_size=4, size='T', num_classes=10, block=block)
        c = torch.randn(3, 96) if block == 'adaln' else torch.randn(3, 2, 96) if block == 'cross_attn' else None
        h = torch.randn(3, 49, 96)
        with torch.no_grad():
            assert torch.equal(o(x, t), torch.zeros_like(x))
            assert not torch.allclose(o.blocks[0](h, c), h)


@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('patch, size, C', [(1, 7, 4), (2, 28, 1), (4, 28, 1), (7, 28, 1), (4, 32, 3)])
def test_every_variant_and_patch_size_has_the_right_shapes(block, patch, size, C):
    for num_classes in (None, 10):
        m = perturbed(DiT(in_channels=C, image_size=size, patch_size=patch, size='T', depth=2, num_classes=num_classes, block=block))
        x, t = torch.randn(2, C, size, size), torch.tensor([5, 900])
        kw = {} if num_classes is None else {'labels': torch.tensor([3, 10])}
        with torch.no_grad(): out = m(x, t, **kw)
        assert out.shape == x.shape and torch.isfinite(out).all()
        maps = attention_maps(m, x, t, **kw)
        extra = (2 if num_classes else 1) if block == 'in_context' else 0
        N = (size // patch) ** 2 + extra
        assert len(maps) == 2 and maps[0].shape == (2, 3, N, N)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 3, N))
    assert m.num_tokens == (size // patch) ** 2


def test_out_channels_and_presets():
    m = DiT(in_channels=4, image_size=8, patch_size=2, size='S', out_channels=8)
    assert m(torch.randn(1, 4, 8, 8), torch.tensor([1])).shape == (1, 8, 8, 8)
    for name, s in DIT_SIZES.items():
        m = DiT(image_size=8, patch_size=4, size=name)
        assert (m.config['dim'], len(m.blocks), m.blocks[0].attn.heads) == (s['dim'], s['depth'], s['heads'])
        assert s['dim'] // s['heads'] == 32


def test_cost_grows_about_fourfold_per_halving_of_the_patch():
    fl = {}
    for p in (7, 4, 2):
        m = DiT(image_size=28, patch_size=p, size='XS', num_classes=10)
        fl[p] = forward_flops(m, torch.randn(1, 1, 28, 28), torch.tensor([3]), labels=torch.tensor([1]))
    assert 3.9 < fl[2] / fl[4] < 4.3 and 2.7 < fl[4] / fl[7] < 3.2     # tokens: 196 / 49 = 4, 49 / 16 = 3.06
    lin = nn.Linear(10, 20)
    assert forward_flops(lin, torch.randn(3, 10)) == 2 * 3 * 10 * 20


def test_attention_weights_are_what_the_fused_attention_applies():
    torch.manual_seed(0)
    a = perturbed(Attention(32, 4))
    x = torch.randn(2, 9, 32)
    w = a.weights(x)                                               # (2, 4, 9, 9)
    v = a.qkv(x).chunk(3, -1)[2].reshape(2, 9, 4, 8).transpose(1, 2)
    manual = a.proj((w @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(a(x), manual, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(9)                                       # self-attention is permutation-equivariant
    torch.testing.assert_close(a(x[:, perm]), a(x)[:, perm], rtol=1e-5, atol=1e-5)


def test_label_dropout_only_in_training_and_the_null_label_is_num_classes():
    torch.manual_seed(0)
    e = LabelEmbedder(10, 8, dropout=0.25)
    y = torch.randint(0, 10, (20000,))
    e.train(); out = e(y)
    dropped = (out == e.table.weight[10]).all(1).float().mean().item()
    assert abs(dropped - 0.25) < 0.015                              # 5 sd of a binomial mean at n = 20,000 is 0.015
    e.eval(); assert torch.equal(e(y), e.table.weight[y])
    m = perturbed(DiT(image_size=8, patch_size=4, size='T', num_classes=7))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t, labels=torch.full((3,), 7)))       # None means the null label, row num_classes
        assert not torch.allclose(m(x, t, labels=torch.tensor([0, 1, 2])), m(x, t))
    with pytest.raises(ValueError, match=r"class_dropout must be a number in \[0, 1\)"): DiT(num_classes=3, class_dropout=1.0)


@pytest.mark.parametrize('block', BLOCKS)
def test_each_variant_learns_and_every_parameter_moves(block):
    torch.manual_seed(0)
    m = DiT(image_size=8, patch_size=2, size='T', depth=2, num_classes=4, block=block, class_dropout=0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = NoiseSchedule.cosine(100)
    x0, y = torch.randn(16, 1, 8, 8).clamp(-1, 1), torch.arange(16) % 4
    g = torch.Generator().manual_seed(1)
    t, eps = torch.randint(0, 100, (16,), generator=g), torch.randn(16, 1, 8, 8, generator=g)
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(m(s.add_noise(x0, eps, t), t, labels=y), eps)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[0] == pytest.approx(eps.pow(2).mean().item(), rel=1e-5)   # zero output at the start
    assert losses[-1] < 0.6 * losses[0]
    moved = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == set(before), set(before) - moved


def test_a_dit_samples_through_every_sampler_with_labels():
    torch.manual_seed(0)
    m = perturbed(DiT(in_channels=4, image_size=7, patch_size=1, size='T', depth=2, num_classes=10), scale=0.02)
    s = NoiseSchedule.cosine(1000)
    x = torch.randn(4, 4, 7, 7)
    y = torch.tensor([0, 5, 9, 10])
    for sampler in SAMPLERS:
        out = sample(m, s, x, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(0), labels=y)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # the label reaches the model: another label, another sample
        assert not torch.allclose(out, sample(m, s, x, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(0), labels=y.flip(0)))


def test_a_dit_ships_and_loads_by_its_card(tmp_path):
    m = perturbed(DiT(in_channels=4, image_size=7, patch_size=1, size='T', depth=2, num_classes=10, block='cross_attn'), scale=0.02)
    card = {'model': {'module': 'diffcourse.dit', 'class': 'DiT', 'kwargs': m.config}, 'schedule': {'name': 'cosine', 'T': 1000},
            'data': {'dataset': 'fmnist', 'image_shape': [4, 7, 7]}}
    save_pretrained(m, card, 'tiny-dit', folder=tmp_path)
    pre = load('tiny-dit', folder=tmp_path)
    x, t, y = torch.randn(2, 4, 7, 7), torch.tensor([3, 700]), torch.tensor([1, 2])
    m16 = DiT(**m.config).eval()                                   # the weights as shipped: rounded to float16
    m16.load_state_dict({k: v.half().float() for k, v in m.state_dict().items()})
    with torch.no_grad(): torch.testing.assert_close(pre.model(x, t, labels=y), m16(x, t, labels=y), rtol=0, atol=1e-6)
    a, b = pre.sample(3, steps=3, labels=torch.tensor([0, 1, 2])), pre.sample(3, steps=3, labels=torch.tensor([0, 1, 2]))
    assert torch.equal(a, b) and a.shape == (3, 4, 7, 7)


def test_modulate_is_per_image_scale_and_shift():
    x = torch.randn(2, 5, 3)
    shift, scale = torch.randn(2, 3), torch.randn(2, 3)
    out = modulate(x, shift, scale)
    torch.testing.assert_close(out[1, 4], x[1, 4] * (1 + scale[1]) + shift[1])


def test_bad_input_is_refused_before_any_computation(monkeypatch):
    m = DiT(image_size=8, patch_size=4, size='T', depth=1, num_classes=10)
    def boom(*a, **k): raise AssertionError("the network ran on bad input")
    monkeypatch.setattr(m.patch_embed, 'forward', boom); monkeypatch.setattr(m.time_emb, 'forward', boom)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    for bad in (dict(x=torch.randn(2, 2, 8, 8), t=t), dict(x=x, t=t, labels=torch.tensor([0, 11])), dict(x=torch.randn(2, 1, 4, 4), t=t)):
        with pytest.raises(ValueError): m(**bad)
