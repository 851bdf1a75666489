import json
import os
import subprocess
import sys

import pytest


@pytest.mark.distributed
def test_two_process_data_parallel_step_equals_single_process(tmp_path):
    out = tmp_path / "verdict.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", "29517",
                        os.path.join(os.path.dirname(__file__), "dist_worker.py"), str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    v = json.loads(out.read_text())
    assert v["world"] == 2
    assert v["moved"] > 1e-3  # the step did something
    assert v["max_param_diff"] < 1e-6  # ... and exactly what one process does on the global batch
    assert v["grad_norm_dp"] == pytest.approx(v["grad_norm_single"], rel=1e-6)
    assert v["same_params_on_ranks"] and v["same_estimator"]
    assert v["buffer_len"] == 3 * (30 + 40)  # every rank saw every rank's pairs
