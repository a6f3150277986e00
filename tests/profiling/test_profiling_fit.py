"""Fitting the latency model: exact data gives the coefficients back, noisy data an honest MAPE."""
import numpy as np
import pytest

from lemix.profiling import ProfileError, fit_const, fit_decode, fit_fwd
from lemix.sched.latency import OpCoeffs

SHAPES = [(c, l) for c in (1, 2, 4, 8, 16) for l in (16, 32, 64, 128, 256, 512)]


def fwd_time(k: OpCoeffs, C, l):
    return k.a + k.b * C * l + k.c * C * l * l


def decode_time(k: OpCoeffs, C, K):
    return k.a + k.b * C + k.c * K


def mape(pred, t):
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(t)) / np.asarray(t)))


def test_fit_fwd_recovers_exact_coefficients():
    true = OpCoeffs(a=2e-3, b=3e-6, c=5e-9)
    got, err = fit_fwd([(C, l, fwd_time(true, C, l)) for C, l in SHAPES])
    for name in "abc":
        assert getattr(got, name) == pytest.approx(getattr(true, name), rel=1e-6)
    assert err < 1e-9


def test_fit_decode_recovers_exact_coefficients():
    true = OpCoeffs(a=1.5e-3, b=4e-5, c=7e-7)
    samples = [(C, C * (P + 1), decode_time(true, C, C * (P + 1)))
               for C in (1, 2, 4, 8, 32) for P in (16, 64, 256)]
    got, err = fit_decode(samples)
    for name in "abc":
        assert getattr(got, name) == pytest.approx(getattr(true, name), rel=1e-6)
    assert err < 1e-9


def test_noisy_fit_reports_the_mape_of_its_own_coefficients():
    rng = np.random.default_rng(0)
    true = OpCoeffs(a=2e-3, b=3e-6, c=5e-9)
    samples = [(C, l, fwd_time(true, C, l) * rng.lognormal(0, 0.1)) for C, l in SHAPES]
    got, err = fit_fwd(samples)
    independent = mape([fwd_time(got, C, l) for C, l, _ in samples], [t for *_, t in samples])
    assert err == pytest.approx(independent, rel=1e-9)
    assert 0.01 < err < 0.15          # about the noise level, and not hiding it
    assert got.b == pytest.approx(true.b, rel=0.3)


def test_small_shapes_weigh_as_much_as_large_ones():
    """Relative weighting: the fixed overhead a is recovered although it is tiny next to the
    largest shapes' times (unweighted least squares would trade it away)."""
    true = OpCoeffs(a=1e-3, b=1e-6, c=1e-8)
    samples = [(C, l, fwd_time(true, C, l) * (1.02 if (C + l) % 2 else 0.98)) for C, l in SHAPES]
    got, err = fit_fwd(samples)
    assert got.a == pytest.approx(true.a, rel=0.1)
    assert err < 0.03


def test_coefficients_are_never_negative():
    # time that falls with C*l (a negative b would fit it best), and decode data with c < 0
    fwd = [(C, l, 0.05 - 1e-6 * C * l + 1e-9 * C * l * l) for C, l in SHAPES]
    dec = [(C, K, 0.01 + 1e-4 * C - 1e-7 * K) for C in (1, 4, 16) for K in (100, 1000, 5000)]
    for fit, samples in ((fit_fwd, fwd), (fit_decode, dec)):
        k, err = fit(samples)
        assert min(k.a, k.b, k.c) >= 0.0
        assert err >= 0.0


def test_fit_const_is_the_median():
    k, err = fit_const([0.010, 0.012, 0.011, 0.5])
    assert k == OpCoeffs(a=0.0115)
    assert err == pytest.approx(mape([0.0115] * 4, [0.010, 0.012, 0.011, 0.5]))
    assert fit_const([(1, 2, 0.2)])[0].a == 0.2        # tuples: the time is the last item


@pytest.mark.parametrize("bad", [[], [(1, 16, 0.0)], [(1, 16, -1.0)], [(1, 16, float("nan"))],
                                 [(1, 16)]])
def test_bad_samples_raise(bad):
    with pytest.raises(ProfileError):
        fit_fwd(bad)


def test_fit_const_bad_samples_raise():
    with pytest.raises(ProfileError):
        fit_const([])
    with pytest.raises(ProfileError):
        fit_const([0.0])
