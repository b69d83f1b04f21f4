"data.load_image_folder on temporary folders of good, corrupt and non-image files."
import io, warnings
import numpy as np
import pytest
import torch
from PIL import Image

from diffcourse.data import load_image_folder, ImageData


def _save(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / 'pics'
    _save(root / 'cats' / 'a.png', np.full((10, 10, 3), (255, 0, 0), np.uint8))
    _save(root / 'cats' / 'deep' / 'b.jpg', np.full((12, 20, 3), (0, 0, 255), np.uint8), quality=95)   # deeper: still 'cats'
    _save(root / 'dogs' / 'c.png', np.zeros((10, 10, 4), np.uint8))                                    # fully transparent: white
    _save(root / 'top.bmp', np.full((6, 6, 3), 128, np.uint8))                                           # in the folder itself
    buf = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, 'JPEG')
    (root / 'dogs' / 'cut.jpg').write_bytes(buf.getvalue()[:300])                                       # a JPEG cut short
    (root / 'dogs' / 'fake.png').write_bytes(b'GIF89a nonsense')                                        # not what its name says
    (root / 'readme.md').write_text('# pictures')
    (root / '.hidden').mkdir(); _save(root / '.hidden' / 'x.png', np.zeros((4, 4, 3), np.uint8))        # ignored, not counted
    (root / '.DS_Store').write_bytes(b'\0\0')
    return root


def test_reads_labels_and_skips_bad_files(folder):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        d = load_image_folder(folder, size=8, progress=False)
    assert isinstance(d, ImageData) and d.images.shape == (4, 3, 8, 8) and d.images.dtype == torch.float32
    assert d.classes == ['cats', 'dogs', 'pics'] and d.titles() == ['cats', 'cats', 'dogs', 'pics']
    assert d.files == ['cats/a.png', 'cats/deep/b.jpg', 'dogs/c.png', 'top.bmp']
    assert len(w) == 1 and 'skipped 1 file(s) that are not images and 2 that could not be decoded (the first: dogs/cut.jpg)' in str(w[0].message)
    red, blue, white, grey = d.images[:, :, 4, 4]
    assert torch.allclose(red, torch.tensor([1., -1., -1.])) and torch.allclose(white, torch.ones(3))
    assert blue[2] > 0.95 and blue[:2].max() < -0.9 and torch.allclose(grey, torch.full((3,), 128 / 127.5 - 1), atol=1e-6)


def test_channels_subset_and_orientation(folder, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        g = load_image_folder(folder, size=8, channels=1, progress=False)
        assert g.images.shape == (4, 1, 8, 8)
        assert torch.allclose(g.images[0, 0, 4, 4], torch.tensor(round(0.299 * 255) / 127.5 - 1), atol=1e-6)       # red as PIL's luma
        sub = load_image_folder(folder, size=8, n=3, progress=False)
    assert len(sub) <= 3 and set(sub.files) <= {'cats/a.png', 'cats/deep/b.jpg', 'dogs/c.png', 'top.bmp'}
    # a picture stored sideways with EXIF orientation 6 (rotate 90° clockwise to view): tall after loading, left half black
    arr = np.full((20, 40, 3), 255, np.uint8); arr[:10] = 0                                             # stored: top half black
    exif = Image.Exif(); exif[0x0112] = 6
    (tmp_path / 'rot').mkdir(); Image.fromarray(arr).save(tmp_path / 'rot' / 'r.jpg', exif=exif.tobytes(), quality=95)
    r = load_image_folder(tmp_path / 'rot', size=20, progress=False).images[0, 0]
    assert r[:, -3:].mean() < -0.9 and r[:, :3].mean() > 0.9                                              # the black top went to the right


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'): load_image_folder(tmp_path / 'nope')
    (tmp_path / 'f.png').write_bytes(b'x')
    with pytest.raises(FileNotFoundError, match='is a file'): load_image_folder(tmp_path / 'f.png')
    (tmp_path / 'e').mkdir(); (tmp_path / 'e' / 'bad.png').write_bytes(b'x'); (tmp_path / 'e' / 'n.txt').write_text('x')
    with pytest.raises(ValueError, match=r'no readable images .*2 file\(s\), 1 not images .* and 1 that could not be decoded'):
        load_image_folder(tmp_path / 'e')
    for kw, msg in (({'size': 0}, 'size must be'), ({'channels': 2}, 'channels must be'), ({'n': 0}, 'n must be')):
        with pytest.raises(ValueError, match=msg): load_image_folder(tmp_path, **kw)
