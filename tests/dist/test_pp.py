"""Pipeline parallelism on 2 gloo ranks: Schedule1F1B (2 stages), ScheduleDualPipeV (4 stages in a V) and
DualPipeV with MTP against the same model without pipelining (one torchrun launch, tests/dist/pp_worker.py;
tolerances stated there). Also the pure stage-splitting helpers and the refusals (MTP under 1F1B, MTP next to data
parallelism, tied embeddings). The real training loop under PP: tests/dist/test_pp_loop.py."""

import json
import subprocess
import sys

import pytest

from tests.dist.dist_common import REPO, env
from train.parallel.pipeline_parallel import stage_layer_ranges, stages_of_rank

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pp") / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests/dist/pp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0 and out.exists(), f"worker failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev", "dualpipev_mtp"])
def test_schedule_matches_no_pipelining(report, schedule):
    assert schedule in report, f"{schedule} did not run"
    assert report[schedule]["ok"], report[schedule]["detail"]


def test_stage_layer_ranges():
    assert stage_layer_ranges(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert stage_layer_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ValueError, match="cannot split 2 decoder layers into 3"):
        stage_layer_ranges(2, 3)


def test_dualpipev_places_first_and_last_stage_on_rank_0():
    assert stages_of_rank("dualpipev", 0, 2) == [0, 3] and stages_of_rank("dualpipev", 1, 2) == [1, 2]
    assert stages_of_rank("1f1b", 1, 2) == [1]
    with pytest.raises(ValueError, match="gpipe"):
        stages_of_rank("gpipe", 0, 2)


def _tiny(**kw):
    from model.config import ModelConfig
    from model.transformer import DeepseekV3

    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                      n_group=1, topk_group=1, num_experts_per_tok=2, kv_lora_rank=8, q_lora_rank=None,
                      qk_rope_head_dim=4, v_head_dim=4, qk_nope_head_dim=4, num_nextn_predict_layers=1,
                      first_k_dense_replace=1, rope_scaling=None, **kw)
    return DeepseekV3(cfg)


def test_mtp_is_refused_under_1f1b_and_next_to_data_parallelism():
    from train.parallel.pipeline_parallel import check_pipeline_model

    with pytest.raises(ValueError, match="num_nextn_predict_layers=1.*pp_schedule=dualpipev"):
        check_pipeline_model(_tiny(), "1f1b", data_parallel=False)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=1 with parallel.pp > 1 and data parallelism"):
        check_pipeline_model(_tiny(), "dualpipev", data_parallel=True)
    check_pipeline_model(_tiny(), "dualpipev", data_parallel=False)  # supported
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        check_pipeline_model(_tiny(tie_word_embeddings=True), "dualpipev", data_parallel=False)
