"""One process of the multi-host test: the tiny model's loss and gradients (the training loss
function, sharded as in training) on a global 8-device mesh, run as 1 process x 8 devices or
2 processes x 4 under `jax.distributed`.

    python multihost_worker.py OUT.npz NUM_PROCESSES PROCESS_ID PORT
"""
import os
import sys


def main(out: str, num_processes: int, process_id: int, port: int) -> None:
  from train_util import FAST_COMPILE
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes} {FAST_COMPILE}"
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  if num_processes > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)
  import dataclasses
  from train import config as config_lib, loop, tokenizer
  from train.stages import rl
  from train_util import TINY
  assert jax.device_count() == 8 and jax.local_device_count() == 8 // num_processes

  cfg = config_lib.from_dict(config_lib.RunConfig, {
      **TINY, "workdir": "unused", "mesh": {"data": 2, "fsdp": 2, "expert": 2},
      "model": {**TINY["model"], "text": {"num_local_experts": 8}}})
  t = loop.build(cfg, cfg.model.build())
  state = loop.initial_state(cfg, t)
  rng = np.random.RandomState(0)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  host = {"tokens": rng.randint(0, 256, shape).astype(np.int32),
          "segment_ids": np.repeat(np.arange(1, 5, dtype=np.int32), shape[1] // 4)[None].repeat(
              shape[0], 0),
          "positions": np.tile(np.arange(shape[1] // 4, dtype=np.int32), 4)[None].repeat(shape[0], 0)}
  # each process supplies only the rows its own devices hold
  batch = {k: jax.make_array_from_callback(shape, t.batch_sharding, lambda idx, v=v: v[idx])
           for k, v in host.items()}
  grad_fn = jax.jit(jax.value_and_grad(t.loss_fn, has_aux=True),
                    out_shardings=(None, t.state_shardings.params))  # grads sharded like params
  (loss, (n, metrics)), grads = grad_fn(state.params, batch)
  flat = {"loss": loss / n, "expert_counts": metrics["expert_counts"]}
  # an RL rollout with the params sharded over both processes: every process gets the same batch
  records = [rl.check_prompt({"prompt": f"{a}+{a}=", "answer": str(2 * a)}, str(a))
             for a in range(12)]
  rl_cfg = config_lib.RLConfig(group_size=4, max_new_tokens=4)
  data_cfg = dataclasses.replace(cfg.data, seq_len=36, batch_size=16)
  rollouts = rl.Rollouts(t.model_cfg, rl_cfg, data_cfg, records, tokenizer.byte_tokenizer(),
                         state.params, reward_fn=lambda rec, text: float(len(text) % 2))
  rollout, stats = rollouts.next_batch(state.params, step=5)
  rl_out = {f"rl_{k}": v for k, v in rollout.items()} | {"rl_reward": np.float32(stats["reward"])}
  flat |= {f"grad{jax.tree_util.keystr(p)}": g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  flat = multihost_utils.process_allgather(flat, tiled=True)
  if process_id == 0:
    np.savez(out, **{k: np.asarray(v) for k, v in flat.items()}, **rl_out)  # rl_: already global


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
