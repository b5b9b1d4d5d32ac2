"""`llama4-convert hf-to-orbax HF_DIR CKPT_DIR [--dtype bf16] [--keep-fp8]` and
`llama4-convert orbax-to-hf CKPT HF_DIR [--quantize fp8]`: streaming conversion for models larger
than RAM, of bf16/fp32 checkpoints and of the FP8 release's layout (llama4_jax/fp8.py);
`llama4-convert merge-lora WORKDIR/checkpoints/STEP CKPT_DIR`: LoRA adapters merged into the base;
`llama4-convert tokenizer TOKENIZER OUT_DIR`: Meta's tokenizer.model (or a tokenizer.json) as HF
tokenizer files with the Llama 4 chat template.

One HF tensor, or one layer's row of a stacked (scanned) array, is in memory at a time: stacked
arrays are zarr arrays chunked by layer row and written/read row by row with tensorstore, and HF
safetensors files are written tensor by tensor behind a header planned in advance. The name and
transform of every tensor come from `llama4_jax.convert`'s one table.

CKPT_DIR (hf-to-orbax's output):
  config.json      the HF config, as stored (orbax-to-hf writes it back)
  params/          an orbax PyTree checkpoint of exactly `l4.init_params`' tree (vision tower
                   included for a multimodal model), restorable onto any mesh:
                   `model.init_from_checkpoint: CKPT_DIR` in a recipe
orbax-to-hf also reads a training checkpoint, `WORKDIR/checkpoints/STEP` (params only; the
optimizer state is not read). Output appears under its final name only once complete.
Tokenizer files travel with the model: hf-to-orbax keeps the HF directory's, orbax-to-hf writes
them back, or, for a training step, writes the run's `data.tokenizer` (none for the byte tokenizer).
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from tqdm import tqdm

import llama4_jax as l4
from llama4_jax import config as config_lib, convert, fp8, hf_io
from train import chat, cli, tokenizer as tokenizer_lib

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}


def _key(k):
  return getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))


def leaf_shapes(cfg: l4.Config, dtype, keep_fp8: bool = False) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Our leaf path (str keys, int list indices; an FP8 expert's `values`/`scale`) -> abstract
  array; nothing allocated."""
  init = lambda: l4.init_params(cfg, jax.random.key(0), dtype)
  abstract = jax.eval_shape((lambda: l4.quantize(init(), "fp8")) if keep_fp8 else init)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {tuple(_key(k) for k in path): leaf for path, leaf in flat}


def _name(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _zarr_dtype(dtype) -> str:
  dtype = np.dtype(dtype)
  return dtype.name if dtype.kind == "V" else dtype.str  # ml_dtypes (bfloat16, float8_*) by name


def _create(path: Path, shape: tuple, dtype, row_chunks: bool) -> ts.TensorStore:
  chunks = [1, *shape[1:]] if row_chunks else list(shape)
  return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                  "metadata": {"shape": list(shape), "chunks": chunks, "dtype": _zarr_dtype(dtype),
                               "compressor": None},  # weights barely compress; speed wins
                  "create": True}).result()


def _write_orbax_metadata(item: Path, leaves: dict[tuple, jax.ShapeDtypeStruct]) -> None:
  """What orbax's StandardCheckpointer reads besides the arrays. The step metadata goes through
  orbax's public metadata API; orbax 0.12 exports no writer for the tree metadata (`_METADATA`),
  so that one is its JSON format (zarr arrays, no OCDBT), read back by orbax in the tests."""
  tree = {str(tuple(str(p) for p in path)): {
      "key_metadata": [{"key": str(p), "key_type": 1 if isinstance(p, int) else 2} for p in path],
      "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                         "write_shape": list(leaf.shape)}} for path, leaf in leaves.items()}
  (item / "_METADATA").write_text(json.dumps({
      "tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
      "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
  handler, now = ocp.StandardCheckpointHandler, time.time_ns()
  step = ocp.metadata.StepMetadata(item_handlers=f"{handler.__module__}.{handler.__qualname__}",
                                   init_timestamp_nsecs=now, commit_timestamp_nsecs=now)
  store = ocp.metadata.metadata_store(enable_write=True, blocking_write=True)
  store.write(item / "_CHECKPOINT_METADATA",
              {k: v for k, v in dataclasses.asdict(step).items() if k != "performance_metrics"})
  store.close()


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.model", "chat_template.jinja")


def copy_tokenizer(src: Path, dst: Path) -> None:
  for name in HF_TOKENIZER_FILES:
    if (src / name).is_file():
      (dst / name).write_bytes((src / name).read_bytes())


def _text_dtype(d: hf_io.HFDir, dtype, keep_fp8: bool):
  if dtype is not None:
    return np.dtype(dtype)
  stored = {dt for n, (dt, _) in d.headers.items() if not (keep_fp8 and "experts." in n)}
  if len(stored) > 1:
    raise hf_io.CheckpointError(f"tensors are stored in {sorted(stored)}; pass --dtype"
                                + (" (with --keep-fp8: the dtype of what is not FP8)" * keep_fp8))
  return np.dtype(hf_io.DTYPES[stored.pop()])


def hf_to_orbax(hf_dir, out_dir, dtype=None, progress: bool = True, overwrite: bool = False,
                keep_fp8: bool = False) -> Path:
  """Streams a HF directory into CKPT_DIR (see the module docstring); returns its path. An FP8
  directory's experts are dequantized to `dtype`, or kept in FP8 (`keep_fp8`: values + scales)."""
  hf_io.check_output(out_dir, (hf_dir,), overwrite)
  d = hf_io.inspect(hf_dir)  # every problem is found before anything is written
  if keep_fp8 and not d.is_fp8:
    raise hf_io.CheckpointError(f"--keep-fp8: {hf_dir} is not an FP8 checkpoint "
                                f"(config.json has no compressed-tensors quantization_config)")
  dtype = _text_dtype(d, dtype, keep_fp8)
  out = Path(out_dir)
  with hf_io.atomic_dir(out, (hf_dir,), overwrite) as tmp:
    leaves = leaf_shapes(d.cfg, dtype, keep_fp8)
    table = convert.routes(d.cfg)
    stacked = {base + p for rule, base, row in table.values() if row is not None for p in rule.ours}
    arrays = {p: _create(tmp / "params" / _name(p), s.shape, s.dtype,
                         p in stacked or p[:-1] in stacked) for p, s in leaves.items()}
    total = sum(int(np.prod(shape)) * np.dtype(hf_io.DTYPES[dt]).itemsize
                for dt, shape in d.headers.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-orbax",
              disable=not progress) as bar:
      get = hf_io.reader(d, keep_fp8, bar.update)
      for name in sorted(table, key=lambda n: (str(d.files.get(n, "")), n)):  # file by file
        rule, base, row = table[name]
        for path, leaf in zip(rule.ours, convert.leaves_from_hf(rule, get(name))):
          parts = ({base + path + (k,): getattr(leaf, k) for k in ("values", "scale")}
                   if isinstance(leaf, l4.quant.FP8Tensor) else {base + path: leaf})
          for p, a in parts.items():
            target = arrays[p] if row is None else arrays[p][row]
            target.write(np.asarray(a, target.dtype.numpy_dtype)).result()
    _write_orbax_metadata(tmp / "params", leaves)
    copy_tokenizer(Path(hf_dir), tmp)
    config = d.config if keep_fp8 else fp8.without_quantization(d.config)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
  return out


class _Source:
  """A params checkpoint to read row by row: CKPT_DIR from hf-to-orbax, or a training step."""

  def __init__(self, path):
    path = Path(path)
    self.is_fp8 = False
    if (path / "params" / "_METADATA").is_file() and (path / "config.json").is_file():
      self.hf_config = json.loads((path / "config.json").read_text())
      self.cfg, self.item, self.names = config_lib.from_hf(self.hf_config), path / "params", ""
      self.tokenizer, self.is_fp8 = path, fp8.is_fp8(self.hf_config)
    elif (path / "state" / "_METADATA").is_file() and (path.parent / "run.json").is_file():
      from train import config as run_config  # the run's recipe says which model it trained
      recipe = json.loads((path.parent / "run.json").read_text())
      run = run_config.from_dict(run_config.RunConfig, recipe)
      if run.lora is not None:
        raise hf_io.CheckpointError(
            f"{path} is a LoRA run's step (adapters only): merge it into its base first with "
            f"`llama4-convert merge-lora {path} CKPT_DIR`, then convert CKPT_DIR")
      self.hf_config, self.cfg = None, run.model.build()
      self.tokenizer = run.data.tokenizer and tokenizer_lib.load(run.data.tokenizer)
      self.item, self.names = path / "state", "params."
    else:
      raise hf_io.CheckpointError(
          f"{path} is neither a converted checkpoint (config.json + params/_METADATA) nor a "
          f"training checkpoint step (state/_METADATA, with run.json beside it)")
    self.ocdbt = (self.item / "manifest.ocdbt").is_file()
    self._open = {}

  def leaf(self, path: tuple) -> ts.TensorStore:
    if path not in self._open:
      name = self.names + _name(path)
      kv = ({"driver": "ocdbt", "base": f"file://{self.item.absolute()}", "path": name + "/"}
            if self.ocdbt else {"driver": "file", "path": str(self.item / name)})
      try:
        self._open[path] = ts.open({"driver": "zarr", "kvstore": kv, "open": True}).result()
      except ValueError as e:
        raise hf_io.CheckpointError(f"{self.item}: cannot read param {name} ({e})") from e
    return self._open[path]



def _fp8_experts(s: _Source, name: str, rule, paths: list, row: int, read, shape) -> dict:
  """The FP8 layout's per-expert weight and scale entries (name -> (shape, dtype, read)) of one
  fused expert tensor: the layer's row is read (and, from plain weights, quantized on the host)
  once, when its first piece is written, and dropped after its last."""
  n = s.cfg.text.num_local_experts
  pending: dict[str, np.ndarray] = {}

  def piece(hf_name: str) -> np.ndarray:
    if not pending:
      if s.is_fp8:
        q = l4.quant.FP8Tensor(*(rule.to_hf(*(np.asarray(s.leaf(p + (k,))[row].read().result())
                                              for p in paths))
                                 for k in ("values", "scale")))
      else:
        q = l4.quant.quantize_fp8(np.asarray(read(), np.float32))
      pending.update(fp8.unfuse(q, name, n))
    return pending.pop(hf_name)
  dtype = lambda hf_name: np.float32 if hf_name.endswith(fp8.SCALE) else ml_dtypes.float8_e4m3fn
  return {hf_name: (hf_shape, np.dtype(dtype(hf_name)), lambda hf_name=hf_name: piece(hf_name))
          for hf_name, hf_shape in fp8.expected({name: shape}, n).items()}


def _plan(s: _Source, to_fp8: bool) -> dict:
  """HF name -> (shape, dtype, function reading it), in the order they are written."""
  produce = {}
  for name, (rule, base, row) in convert.routes(s.cfg).items():
    fp8_experts = to_fp8 and fp8.per_expert(name, s.cfg.text.num_local_experts)
    paths = [base + p for p in rule.ours]
    stores = [s.leaf(p + ("values",) if s.is_fp8 and fp8_experts else p) for p in paths]
    dtype = np.dtype(stores[0].dtype.numpy_dtype)
    read = lambda stores=stores, row=row, rule=rule: rule.to_hf(
        *(np.asarray((st if row is None else st[row]).read().result()) for st in stores))
    shape = jax.eval_shape(rule.to_hf, *(jax.ShapeDtypeStruct(
        st.shape if row is None else st.shape[1:], dtype) for st in stores)).shape
    if fp8_experts:
      produce.update(_fp8_experts(s, name, rule, paths, row, read, shape))
    else:
      produce[name] = (shape, dtype, read)
  return produce


def orbax_to_hf(src, hf_dir, max_shard_bytes: int = 5 * 2**30, progress: bool = True,
                overwrite: bool = False, quantize: str | None = None) -> Path:
  """Streams a params checkpoint into a HF directory `from_pretrained` loads: in the FP8 release's
  layout when the checkpoint keeps FP8 experts or `quantize="fp8"` (experts quantized per channel
  on the host, bit-exact with compressed-tensors)."""
  hf_io.check_output(hf_dir, (src,), overwrite)
  s = _Source(src)
  to_fp8 = s.is_fp8 or quantize == "fp8"
  produce = _plan(s, to_fp8)
  dtypes = {dtype for n, (_, dtype, _) in produce.items()
            if dtype.itemsize > 1 and not n.endswith(fp8.SCALE)}
  hf_config = s.hf_config or config_lib.to_hf(
      s.cfg, dtype=hf_io.DTYPE_NAMES[max(dtypes, key=lambda d: d.itemsize)])
  if to_fp8 and not fp8.is_fp8(hf_config):
    hf_config = {**hf_config, "quantization_config": fp8.quantization_config()}
  out = Path(hf_dir)
  with hf_io.atomic_dir(out, (src,), overwrite) as tmp:
    total = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype, _ in produce.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="orbax-to-hf",
              disable=not progress) as bar:
      hf_io.write_safetensors(tmp, produce, max_shard_bytes, bar.update)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if isinstance(s.tokenizer, Path):
      copy_tokenizer(s.tokenizer, tmp)
    elif s.tokenizer:
      chat.save_tokenizer(s.tokenizer, tmp)
  return out


def merge_lora(step_dir, out_dir, dtype=None, overwrite: bool = False) -> Path:
  """A LoRA (or QLoRA) training step merged into its base -> CKPT_DIR (config.json + params/), the
  format `orbax-to-hf` converts and `model.init_from_checkpoint` starts from. In host memory."""
  import orbax.checkpoint as ocp
  import sharding
  from train import config as run_config, params as params_lib
  step_dir = Path(step_dir)
  hf_io.check_output(out_dir, (step_dir,), overwrite)
  if not (step_dir.parent / "run.json").is_file():
    raise hf_io.CheckpointError(f"{step_dir}: not a training step (no run.json beside it)")
  run = run_config.from_dict(run_config.RunConfig,
                             json.loads((step_dir.parent / "run.json").read_text()))
  if run.lora is None:
    raise hf_io.CheckpointError(f"{step_dir}: not a LoRA run (its recipe has no lora section)")
  cfg = run.model.build()
  dtype = dtype or np.dtype(run.model.param_dtype)
  params = params_lib.restore_params(step_dir, cfg, sharding.one_device(), dtype)
  out = Path(out_dir)
  with hf_io.atomic_dir(out, (step_dir,), overwrite) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:  # closing waits for the write
      checkpointer.save((tmp / "params").absolute(), params)
    hf_config = config_lib.to_hf(cfg, dtype=hf_io.DTYPE_NAMES[np.dtype(dtype)])
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if run.data.tokenizer:
      chat.save_tokenizer(tokenizer_lib.load(run.data.tokenizer), tmp)
  return out


def save_tokenizer(src, out_dir, overwrite: bool = False) -> Path:
  """`llama4-convert tokenizer`: the tokenizer at `src` as HF files in `out_dir`."""
  tok = tokenizer_lib.load(src)
  tokenizer_lib.specials(tok)  # a Llama 4 tokenizer: the chat format's tokens are there
  with hf_io.atomic_dir(Path(out_dir), (src,), overwrite) as tmp:
    chat.save_tokenizer(tok, tmp)
  return Path(out_dir)


def main(argv=None) -> int:
  parser = cli.Parser(prog="llama4-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-orbax", help="HF directory -> CKPT_DIR")
  a.add_argument("--dtype", choices=sorted(DTYPES), help="default: as stored (an FP8 checkpoint's "
                                                          "experts dequantize to it)")
  a.add_argument("--keep-fp8", action="store_true",
                 help="an FP8 checkpoint's experts stay fp8 + scales: a frozen base for LoRA and "
                      "inference, dequantized one layer at a time")
  b = sub.add_parser("orbax-to-hf", help="CKPT_DIR or WORKDIR/checkpoints/STEP -> HF directory")
  b.add_argument("--max-shard-gb", type=float, default=5.0)
  b.add_argument("--quantize", choices=["fp8"],
                 help="write the routed experts in FP8 (the FP8 release's layout, per-channel "
                      "scales); a checkpoint kept in FP8 is always written so")
  c = sub.add_parser("merge-lora", help="a LoRA/QLoRA run's WORKDIR/checkpoints/STEP -> CKPT_DIR "
                                         "(base + adapters)")
  c.add_argument("--dtype", choices=sorted(DTYPES), help="default: the run's param_dtype")
  d = sub.add_parser("tokenizer", help="Meta's tokenizer.model or a tokenizer.json -> HF "
                                       "tokenizer files with the chat template")
  for p in (a, b, c, d):
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DST (never the source, inside it or above it)")
    cli.add_debug(p)
  args = parser.parse_args(argv)
  if args.command == "orbax-to-hf" and not args.max_shard_gb > 0:
    parser.error(f"--max-shard-gb must be positive, got {args.max_shard_gb}")

  def convert() -> int:
    if args.command == "hf-to-orbax":
      out = hf_to_orbax(args.src, args.dst, DTYPES.get(args.dtype), overwrite=args.overwrite,
                        keep_fp8=args.keep_fp8)
    elif args.command == "tokenizer":
      out = save_tokenizer(args.src, args.dst, args.overwrite)
    elif args.command == "merge-lora":
      out = merge_lora(args.src, args.dst, DTYPES.get(args.dtype), args.overwrite)
    else:
      out = orbax_to_hf(args.src, args.dst, int(args.max_shard_gb * 2**30),
                        overwrite=args.overwrite, quantize=args.quantize)
    print(out)
    return 0
  return cli.run("llama4-convert", convert, args.debug)


if __name__ == "__main__":
  sys.exit(main())
