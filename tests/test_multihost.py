"""Multi-host: 2 processes x 4 fake CPU devices under `jax.distributed` (localhost) compute the same
loss and gradients as 1 process x 8 devices, each process feeding only its own rows, and the same
RL rollout (sampling with params sharded over both processes)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(out: Path, num_processes: int, process_id: int, port: int) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its devices
  return subprocess.Popen([sys.executable, str(WORKER), str(out), str(num_processes),
                           str(process_id), str(port)], cwd=WORKER.parent, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  port = _free_port()
  procs = [_start(tmp_path / "one.npz", 1, 0, 0),
           _start(tmp_path / "two.npz", 2, 0, port), _start(tmp_path / "two.npz", 2, 1, port)]
  for p in procs:
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-4000:]
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(one.files) == sorted(two.files)
  assert sum(k.startswith("grad[") for k in one.files) > 20
  np.testing.assert_array_equal(two["expert_counts"], one["expert_counts"])
  assert one["expert_counts"].sum() == 2 * 8 * 32  # 2 MoE layers, every token of the batch
  np.testing.assert_array_equal(two["rl_tokens"], one["rl_tokens"])  # the same samples
  assert one["rl_completion_mask"].sum() > 0
  for k in one.files:
    np.testing.assert_allclose(two[k], one[k], atol=1e-5, rtol=0, err_msg=k)
