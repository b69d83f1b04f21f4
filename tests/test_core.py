import io, os
import numpy as np, pytest, torch
from PIL import Image
from diffcourse.core import is_quick, pick, default_device, seed_everything, to_unit, make_grid, show_images, save_animation


def test_quick_mode(monkeypatch):
    monkeypatch.delenv('IN_TEST', raising=False); monkeypatch.delenv('DIFFCOURSE_QUICK', raising=False)
    assert not is_quick() and pick(10, 1) == 10
    monkeypatch.setenv('DIFFCOURSE_QUICK', 'false'); assert not is_quick()
    monkeypatch.setenv('IN_TEST', '1'); assert is_quick() and pick(10, 1) == 1


def test_device(monkeypatch):
    assert default_device('cpu') == torch.device('cpu')
    monkeypatch.setenv('DIFFCOURSE_DEVICE', 'cpu'); assert default_device() == torch.device('cpu')
    with pytest.raises(ValueError, match="device must be"): default_device('gpu-please')


def test_seed_repeats_all_generators():
    import random
    g1 = seed_everything(3); a = (torch.randn(4), np.random.rand(2), random.random(), torch.randn(2, generator=g1))
    g2 = seed_everything(3); b = (torch.randn(4), np.random.rand(2), random.random(), torch.randn(2, generator=g2))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])
    with pytest.raises(TypeError, match="seed must be an int"): seed_everything('7')


@pytest.mark.parametrize('shape', [(28, 28), (1, 28, 28), (5, 28, 28), (5, 1, 28, 28), (3, 3, 8, 8)])
def test_grid_accepts_shapes(shape):
    g = make_grid(torch.rand(shape) * 2 - 1)
    assert g.ndim == 3 and g.shape[0] in (1, 3) and 0 <= g.min() and g.max() <= 1


def test_to_unit_ranges():
    x = torch.tensor([-1., 0., 1.]).reshape(1, 1, 1, 3)
    assert torch.allclose(to_unit(x).flatten(), torch.tensor([0., .5, 1.]))
    assert torch.allclose(to_unit(x.clamp(0)).flatten(), torch.tensor([0., 0., 1.]))
    assert torch.allclose(to_unit(x * 255, value_range=(0, 255)).flatten(), torch.tensor([0., 0., 1.]))
    with pytest.raises(ValueError, match="value_range"): to_unit(x, value_range=(1, 1))


def test_bad_images():
    with pytest.raises(ValueError, match="1 or 3 channels"): make_grid(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3, 4, 5\)"): make_grid(torch.zeros(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="one entry per image"): show_images(torch.zeros(3, 1, 4, 4), titles=['a'])


def test_animation_written_atomically(tmp_path):
    frames = [torch.full((2, 1, 4, 4), v) for v in (-1., 0., 1.)]
    anim = save_animation(frames, tmp_path / 'a.gif', hold_last=0)
    assert (tmp_path / 'a.gif').read_bytes() == anim.data
    assert not list(tmp_path.glob('*.tmp'))
    assert Image.open(io.BytesIO(anim.data)).n_frames == 3
    assert anim._repr_html_().startswith('<img src="data:image/gif;base64,')
    with pytest.raises(ValueError, match="at least one frame"): save_animation([])
