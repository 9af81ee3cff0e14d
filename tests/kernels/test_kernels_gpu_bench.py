"""bench/kernels_gpu.py runs as written: every measured code path, on tiny shapes, on this machine's device.

The timer is replaced by a single call (timings are never asserted in tests); what is checked is that every
implementation ran and computed the GEMM it claims (relative error against bf16 at the e4m3 level), and that
without a GPU the benchmark refuses with a message instead of measuring anything.
"""

import pytest
import torch

from bench import kernels_gpu

pytest.importorskip("torchao")


def one_call(fn, rep):
    fn()
    return (1.0, 1.0, 1.0)


def errors(rows: list[dict]) -> dict[str, float]:
    return {r["impl"]: float(r["rel_err_vs_bf16"]) for r in rows if r.get("rel_err_vs_bf16")}


def test_dense_and_grouped_paths_compute_their_gemms(device):
    dense = kernels_gpu.dense_shape(64, 256, 128, rep=1, device=device, timer=one_call)
    want = {"bf16", "scaled_mm_rowwise", "ours_blockwise", "ours_with_act_quant", "torchao_rowwise_fwd"}
    assert {r["impl"] for r in dense} == want
    assert all(0.0 < e < 0.06 for impl, e in errors(dense).items() if impl != "bf16")
    assert all(r["ratio_vs_scaled_mm"] == 1.0 for r in dense if r["impl"].startswith("ours"))
    counts = kernels_gpu.routed_counts(64, 8, 2)
    assert int(counts.sum()) % 16 == 0 and bool((counts % 16 == 0).all())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
    grouped = kernels_gpu.grouped_shape("experts", offsets, 128, 256, topk=2, rep=1, timer=one_call)
    impls = {r["impl"] for r in grouped}
    assert {"ours_fprop", "ours_dgrad", "ours_wgrad"} <= impls
    for impl, e in errors(grouped).items():
        assert e == 0.0 if impl.startswith("bf16") else 0.0 < e < 0.06, (impl, e)
    quant = kernels_gpu.bench_quant(64, rep=1, K=256, N=256, device=device, timer=one_call)
    assert [r["impl"] for r in quant] == ["act_quant", "act_quant_t", "weight_quant"]


def test_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exit_info:
        kernels_gpu.main(["--no-csv"])
    assert exit_info.value.code == 2 and "nothing was measured" in capsys.readouterr().out
