"""Collective bytes read from compiled HLO: a program whose traffic is known, compiled by XLA:CPU on
8 fake devices, and the forms the TPU compiler writes (loops bounded by their condition, fused
all-reduce-scatter, iota and mesh replica groups)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from train import hlo


def test_a_scan_of_known_collectives_on_8_devices():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))

  def body(x):  # per device x: [8, 256] f32 = 8 KiB
    def step(c, _):
      c = jax.lax.psum(c, "b") * 0.5                     # all-reduce over 4
      return c + jax.lax.all_gather(c, "a", tiled=True)[:8], None  # all-gather over 2
    return jax.lax.scan(step, x, None, length=3)[0]
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("a"), out_specs=P("a"), check_vma=False))
  text = f.lower(jax.ShapeDtypeStruct((16, 256), jnp.float32)).compile().as_text()
  got = hlo.collective_bytes(text, 8)
  kib = 8 * 1024
  assert got["all-reduce"] == 3 * 2 * kib * 3 / 4    # 3 steps x 2 (n-1)/n x size
  assert got["all-gather"] == 3 * 2 * kib * 1 / 2    # 3 steps x (n-1)/n x output
  assert got["reduce-scatter"] == got["all-to-all"] == 0


TPU_STYLE = """HloModule m

%all-reduce-scatter.1 (input.1: bf16[64,96]) -> bf16[32,96] {
  %input.1 = bf16[64,96]{1,0:T(8,128)(2,1)} parameter(0)
  %all-reduce.2 = bf16[64,96]{1,0:T(8,128)(2,1)} all-reduce(%input.1), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %ds = bf16[32,96]{1,0} dynamic-slice(%all-reduce.2, %c0, %c0), dynamic_slice_sizes={32,96}
}

%cond (p: (s32[], f32[16])) -> pred[] {
  %constant.9 = s32[]{:T(128)} constant(12)
  %p = (s32[], f32[16]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %constant.9), direction=LT
}

%body (p.1: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p.1 = (s32[], f32[16]) parameter(0)
  %x = bf16[64,96]{1,0} parameter(1)
  %fusion.1 = bf16[32,96]{1,0:T(8,128)(2,1)} fusion(%x), kind=kCustom, calls=%all-reduce-scatter.1
  %ag = (f32[128]{0}, f32[1024]{0}) all-gather-start(%y), replica_groups=[1,8]<=[8], dimensions={0}
  %a2a = s32[4,256]{1,0} all-to-all(%z), replica_groups=mesh['data'=2,'expert'=4] {'expert'}, dimensions={0}
  ROOT %t = (s32[], f32[16]) tuple(%i, %w)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[], f32[16]) while(%init), condition=%cond, body=%body
  %ar = f32[256]{0} all-reduce-start(%a), replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %r = f32[16] get-tuple-element(%w), index=1
}
"""


def test_tpu_forms_loops_fusions_and_replica_groups():
  got = hlo.collective_bytes(TPU_STYLE, 8)
  assert got["reduce-scatter"] == 12 * (64 * 96 * 2) * 1 / 2   # 12 iterations, group of 2
  assert got["all-gather"] == 12 * 1024 * 4 * 7 / 8            # the output of the pair
  assert got["all-to-all"] == 12 * 4 * 256 * 4 * 3 / 4         # over 'expert' (4)
  assert got["all-reduce"] == 2 * 256 * 4 * 3 / 4              # once, groups of 4
