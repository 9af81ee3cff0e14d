"""`compare_params`: strict on entries a gradient drove, 10 x looser only on those whose every gradient was noise."""

import torch

from tests.dist.dist_common import compare_params


def _case():
    want = {"w": torch.full((10, 10), 0.5), "buf": torch.zeros(3)}
    v_sq = torch.full((10, 10), 1e-6)
    v_sq[0, 0] = 1e-18  # one entry that only ever saw rounding noise
    return want, {"w.exp_avg_sq": v_sq}


def test_noise_gradient_entries_get_the_looser_bound_only():
    want, moments = _case()
    got = {k: v.clone() for k, v in want.items()}
    got["w"][0, 0] += 5e-5  # Adam-amplified noise: allowed
    assert compare_params(got, want, moments, atol=1e-5, rtol=1e-4) == []
    got["w"][0, 0] += 1e-3  # beyond 10 x atol even there
    assert compare_params(got, want, moments, atol=1e-5, rtol=1e-4)


def test_gradient_driven_entries_buffers_and_nans_are_held_strictly():
    want, moments = _case()
    for name, index, delta in (("w", (1, 1), 2e-4), ("buf", (0,), 5e-5), ("w", (2, 2), float("nan"))):
        got = {k: v.clone() for k, v in want.items()}
        got[name][index] += delta
        assert compare_params(got, want, moments, atol=1e-5, rtol=1e-4), (name, delta)

