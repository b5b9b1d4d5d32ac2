"""Width coordinate check (CI-sized): the tiny Llama 4 (dense + MoE with a shared expert, RoPE and
NoPE layers, QK norm) at widths 32 -> 256, a few Adam steps on one fixed batch. Under `mup` no
tracked activation's change grows with width; under the `sp` control they do."""
import numpy as np
import pytest

from train import metap_check as mc
from train.config import MetaPConfig, OptimConfig

WIDTHS = [32, 64, 128, 256]


@pytest.mark.slow
def test_mup_activations_move_the_same_at_every_width_and_sp_does_not():
  base = mc.base_overrides(mc.width_config(32))
  opt = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1e9,
                    eps=1e-12)
  # 64 tokens of 16 ids: every width exceeds the batch's distinct inputs (see metap_notes.md 3.3)
  ids = np.random.default_rng(0).integers(0, 16, (2, 32)).astype(np.int32)
  moved = mc.coord_check(WIDTHS, {p: (lambda w, p=p: MetaPConfig(preset=p, base=base))
                                  for p in ("mup", "sp")},
                         opt, ids, steps=5, seeds=4,
                         make_cfg=lambda w: mc.width_config(w, init_std=0.1))
  mup, sp = mc.slopes(WIDTHS, moved["mup"]), mc.slopes(WIDTHS, moved["sp"])
  report = "\n".join(f"{k:22} mup {mup[k]:+.2f}  sp {sp[k]:+.2f}" for k in mup)
  assert set(mup) == {"layer0.resid", "layer1.resid", "moe0.router_logits", "logits"}, report
  assert all(abs(s) <= 0.2 for s in mup.values()), report
  assert np.median(list(sp.values())) >= 0.4, report
  # at the proxy's width both are the same model and optimizer: the same numbers
  for k in moved["mup"]:
    assert moved["mup"][k][0] == moved["sp"][k][0], k
