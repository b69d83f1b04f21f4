"FID and KID against closed forms, scipy and a direct implementation; the shipped classifier loads offline and classifies well."
import json, math
import numpy as np, pytest, torch
import scipy.linalg
from diffcourse import metrics
from diffcourse.metrics import (sqrtm_psd, trace_sqrt_product, frechet_distance, feature_stats, fid, kid, mmd2_unbiased,
                                polynomial_kernel, features, class_accuracy, predict, evaluate, load_classifier, FashionClassifier)
from diffcourse.pretrained import WEIGHTS_DIR, available
from diffcourse.data import load_fashion_mnist

torch.set_num_threads(1)

def _spd(d, seed, ridge=0.1):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + ridge * np.eye(d)

def _gauss(n, mu, cov, seed):
    return torch.from_numpy(np.random.default_rng(seed).multivariate_normal(mu, cov, size=n))

# --- matrix square root and the Fréchet distance ---

@pytest.mark.parametrize('d,seed', [(2, 0), (10, 1), (64, 2)])
def test_sqrtm_matches_scipy(d, seed):
    s1, s2 = _spd(d, seed), _spd(d, seed + 100)
    r = sqrtm_psd(torch.from_numpy(s1)).numpy()
    np.testing.assert_allclose(r, scipy.linalg.sqrtm(s1).real, atol=1e-10)
    np.testing.assert_allclose(r @ r, s1, atol=1e-10)
    want = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(torch.from_numpy(s1), torch.from_numpy(s2)) == pytest.approx(want, rel=1e-9)

def test_sqrtm_psd_clamps_rounding_negatives():
    v = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))[0]
    a = v @ np.diag([1.0, 0.5, 0.0, -1e-15, 0.0]) @ v.T          # PSD up to rounding
    r = sqrtm_psd(torch.from_numpy(a))
    assert torch.isfinite(r).all() and torch.allclose(r @ r, torch.from_numpy(a), atol=1e-10)

def test_frechet_closed_forms():
    mu1, mu2 = np.array([1., 2., 3.]), np.array([0., 2., 5.])
    a, b = np.array([1., 4., 9.]), np.array([4., 1., 2.])           # commuting (diagonal) covariances
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    s1, s2 = _spd(2, 3), _spd(2, 4)                                  # 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    tr = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    want = ((mu1[:2] - mu2[:2]) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1[:2], s1, mu2[:2], s2) == pytest.approx(want, rel=1e-10)

def test_fid_self_zero_and_symmetric():
    x, y = _gauss(500, np.zeros(16), _spd(16, 5), 0), _gauss(400, np.ones(16) * 0.3, _spd(16, 6), 1)
    assert abs(fid(x, x)) < 1e-9
    assert fid(x, y) == pytest.approx(fid(y, x), rel=1e-10)
    assert fid(x, y) > 1

def test_fid_estimates_the_gaussians_distance():
    mu2, c1, c2 = np.full(8, 0.5), _spd(8, 7), _spd(8, 8)
    x, y = _gauss(40_000, np.zeros(8), c1, 2), _gauss(40_000, mu2, c2, 3)
    assert fid(x, y) == pytest.approx(frechet_distance(np.zeros(8), c1, mu2, c2), rel=0.03)

def test_feature_stats():
    x = _gauss(300, np.zeros(4), _spd(4, 9), 4)
    mu, cov = feature_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0)); np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy().T))

# --- KID ---

def _mmd2_direct(x, y):
    k = lambda u, v: (float(np.dot(u, v)) / len(u) + 1) ** 3
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy

def test_kid_matches_direct_implementation():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(15, 3)), g.normal(0.5, 1, size=(12, 3))
    assert mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_mmd2_direct(x, y), rel=1e-12)
    m, se = kid(x, y, subsets=1)
    assert m == pytest.approx(_mmd2_direct(x, y), rel=1e-12) and math.isnan(se)
    # with blocks: each block is a direct MMD² of disjoint rows after one shuffle
    perm = torch.Generator().manual_seed(3)
    pa, pb = torch.randperm(15, generator=perm).numpy(), torch.randperm(12, generator=perm).numpy()
    vals = [_mmd2_direct(x[pa][i * 5:(i + 1) * 5], y[pb][i * 4:(i + 1) * 4]) for i in range(3)]
    m, se = kid(x, y, subsets=3, seed=3)
    assert m == pytest.approx(np.mean(vals), rel=1e-12) and se == pytest.approx(np.std(vals, ddof=1) / math.sqrt(3), rel=1e-10)

def test_kid_unbiased_same_distribution_and_positive_when_shifted():
    c = _spd(16, 10)
    x, y = _gauss(4000, np.zeros(16), c, 5), _gauss(4000, np.zeros(16), c, 6)
    m, se = kid(x, y, subsets=20)
    assert se > 0 and abs(m) < 2 * se
    m2, se2 = kid(x, y + 0.3, subsets=20)
    assert m2 > 10 * se2 and m2 > 10 * abs(m)

def test_kid_unbiased_over_many_small_draws():
    "The mean of many small-sample KIDs is 0 within its error (FID, in contrast, is biased upward at small n)."
    c = _spd(8, 11)
    vals = [kid(_gauss(40, np.zeros(8), c, 2 * s), _gauss(40, np.zeros(8), c, 2 * s + 1), subsets=1)[0] for s in range(200)]
    assert abs(np.mean(vals)) < 2.5 * np.std(vals) / math.sqrt(len(vals))

# --- bad inputs ---

def test_bad_feature_inputs():
    x = torch.randn(50, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match='same width'): fid(x, torch.randn(50, 5))
    with pytest.raises(ValueError, match=r'needs more than 64'): fid(torch.randn(40, 64), torch.randn(100, 64))
    with pytest.raises(ValueError, match=r'must be features \(N, D\)'): fid(torch.randn(10), x)
    with pytest.raises(ValueError, match='NaN'): fid(torch.full((50, 4), float('nan')), x)
    with pytest.raises(ValueError, match='subsets must be a positive int'): kid(x, x, subsets=0)
    with pytest.raises(ValueError, match='fewer than 2 rows'): kid(x[:10], x, subsets=6)
    with pytest.raises(ValueError, match='subset_size must be an int from 2 to 5'): kid(x, x, subsets=10, subset_size=6)

def test_bad_image_inputs():
    clf = FashionClassifier(channels=(4, 8)).eval()
    with pytest.raises(TypeError, match=r'must be a float tensor \(N, C, H, W\)'): features(torch.zeros(28, 28), clf)
    with pytest.raises(TypeError, match='float tensor'): features(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), clf)
    with pytest.raises(ValueError, match=r'must be in \[-1, 1\]'): features(torch.full((2, 1, 28, 28), 255.), clf)
    with pytest.raises(ValueError, match='NaN'): features(torch.full((2, 1, 28, 28), float('nan')), clf)
    with pytest.raises(ValueError, match='empty'): features(torch.zeros(0, 1, 28, 28), clf)
    with pytest.raises(ValueError, match='batch_size'): features(torch.zeros(2, 1, 28, 28), clf, batch_size=0)
    with pytest.raises(ValueError, match='labels must be 2 integer classes'): class_accuracy(torch.zeros(2, 1, 28, 28), [0.5, 1.], clf)
    with pytest.raises(TypeError, match=r'\.features\(x\)'): features(torch.zeros(2, 1, 28, 28), torch.nn.Linear(2, 2))

# --- the shipped classifier ---

def test_classifier_shipped_small_and_declared():
    assert 'fmnist-classifier' in available()
    card = json.loads((WEIGHTS_DIR/'fmnist-classifier.json').read_text())
    assert card['kind'] == 'classifier' and card['command'].startswith('python tools/train_classifier.py ')
    assert card['test_accuracy'] > 0.92 and 'schedule' not in card
    assert (WEIGHTS_DIR/'fmnist-classifier.safetensors').stat().st_size < 2 * 2**20

@pytest.fixture
def fresh_classifier(offline_no_pickle):
    "The classifier cache emptied, so the test really loads the file under `offline_no_pickle` (conftest)."
    metrics._classifiers.clear()

def test_classifier_loads_offline_and_classifies(fresh_classifier):
    clf = load_classifier()
    assert not clf.training and not any(p.requires_grad for p in clf.parameters()) and clf.image_shape == (1, 28, 28)
    assert load_classifier() is clf                                    # loaded once, then reused
    test = load_fashion_mnist('test', n=1000)
    assert class_accuracy(test.images, test.labels) > 0.90
    f = features(test.images[:300])
    assert f.shape == (300, clf.feature_dim) and f.dtype == torch.float64
    with pytest.raises(ValueError, match=r'crop 32x32'): features(torch.zeros(2, 1, 32, 32))

def test_evaluate_on_real_images():
    test = load_fashion_mnist('test', n=1000)
    r = evaluate(test.images[:500], test.images[500:], labels=test.labels[:500])
    assert r['n'] == 500 and r['n_reference'] == 500 and r['class_accuracy'] > 0.9
    assert r['fid'] > 0 and abs(r['kid']) < 2 * r['kid_se']
    noisy = (test.images[:500] + 0.5 * torch.randn(500, 1, 28, 28, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    r2 = evaluate(noisy, test.images[500:])
    assert r2['fid'] > 5 * r['fid'] and r2['kid'] > 5 * r2['kid_se']

def test_metric_floor():
    from diffcourse.metrics import metric_floor
    c = _spd(8, 12)
    pool, ref = _gauss(3000, np.zeros(8), c, 7), _gauss(2000, np.zeros(8), c, 8)
    small, big = metric_floor(pool, ref, 100, draws=4), metric_floor(pool, ref, 2000, draws=4)
    assert small['n'] == 100 and small['draws'] == 4 and small['fid'] > big['fid'] > 0   # FID's bias shrinks with n
    assert metric_floor(pool, ref, 100, draws=4) == small                             # seeded
    with pytest.raises(ValueError, match="n must be an int from 2 to the pool's 3000 rows"): metric_floor(pool, ref, 5000)
    with pytest.raises(ValueError, match='draws must be a positive int'): metric_floor(pool, ref, 100, draws=0)
