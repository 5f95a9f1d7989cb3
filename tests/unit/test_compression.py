"""Delta compression: bytes, rounding error, error feedback that loses nothing, NaN kept."""

import numpy as np
import pytest

from workers.compression import BLOCK, pack_delta, payload_bytes, unpack_delta


def delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (rng.standard_normal((300, 70)) * 1e-3).astype(np.float32),
            "b": (rng.standard_normal(70) * 1e-2).astype(np.float32)}


def test_fp32_is_sent_as_it_is():
    d = delta()
    payload, residual = pack_delta(d, kind="fp32", residual=None)
    assert payload is d and residual is None and payload_bytes(payload) == 4 * (300 * 70 + 70)


def block_max(array: np.ndarray) -> np.ndarray:
    """Each value's own block's largest magnitude (blocks of BLOCK over the flattened tensor,
    the last one short), shaped like `array`."""
    flat = np.abs(array.ravel())
    peaks = [flat[i:i + BLOCK].max() for i in range(0, flat.size, BLOCK)]
    return np.repeat(peaks, BLOCK)[:flat.size].reshape(array.shape)


# bf16 keeps 8 significant bits: half an ulp is 2**-9 of each value, 2**-8 leaves room.
# int8 rounds value / (block max / 127) to an integer: at most half a step, block max / 254.
@pytest.mark.parametrize(("kind", "share", "tolerance"),
                         [("bf16", 0.5, 2**-8), ("int8", 0.27, 0.5 / 127)])
def test_compressed_sizes_and_rounding_error(kind, share, tolerance):
    d = delta()
    # Magnitudes spread over six decades along w's rows (and 100x between b's halves), so a
    # block's largest value is far below the tensor's for most blocks: a bound (or a scale)
    # taken from the whole tensor would not do.
    d["w"] *= np.logspace(-3, 3, d["w"].shape[0], dtype=np.float32)[:, None]
    d["b"][:35] *= 100
    payload, residual = pack_delta(d, kind=kind, residual=None)
    assert payload_bytes(payload) <= share * payload_bytes(d)
    restored = unpack_delta(payload)
    for name, array in d.items():
        assert restored[name].shape == array.shape and restored[name].dtype == np.float32
        # bf16: relative to each value; int8: relative to its own block's largest value
        # (with fp32 rounding of the division and the product on top).
        bound = np.abs(array) if kind == "bf16" else block_max(array) * (1 + 1e-6)
        error = np.abs(restored[name] - array)
        worst = np.unravel_index(np.argmax(error - tolerance * bound), array.shape)
        assert (error <= tolerance * bound).all(), \
            f"{name}{worst}: error {error[worst]:.3g} over the bound {tolerance * bound[worst]:.3g}"
        assert np.array_equal(residual[name], array - restored[name])


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_error_feedback_delays_but_never_loses_any_part_of_the_updates(kind):
    residual, sent, true = None, 0.0, 0.0
    for round_index in range(20):
        d = delta(round_index)
        payload, residual = pack_delta(d, kind=kind, residual=residual)
        sent = sent + unpack_delta(payload)["w"].astype(np.float64)
        true = true + d["w"].astype(np.float64)
    # What arrived plus what is still held equals everything the site produced.
    assert np.allclose(sent + residual["w"], true, atol=1e-7)
    assert np.abs(residual["w"]).max() < np.abs(true).max() / 50  # and little is pending


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_nan_and_inf_reach_validation(kind):
    d = delta()
    d["w"][3, 4], d["b"][BLOCK // 4] = np.nan, np.inf
    restored = unpack_delta(pack_delta(d, kind=kind, residual=None)[0])
    assert not np.isfinite(restored["w"]).all() and not np.isfinite(restored["b"]).all()
