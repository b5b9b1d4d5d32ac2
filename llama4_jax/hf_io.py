"""Load and save HF Llama 4 directories (config.json + one or sharded safetensors) in memory.

Every problem is reported before any array is built: a missing, unexpected or mis-shaped tensor,
an unsupported dtype, a shard the index names but the directory lacks, a truncated file. Saving
writes into a temporary sibling directory and renames it into place, so a failed save leaves no
half-written checkpoint.
"""
import contextlib
import functools
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from llama4_jax import config as config_lib
from llama4_jax import convert, fp8
from llama4_jax.config import Config
from llama4_jax.quant import FP8Tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn}  # FP8: only where fp8.py's layout has it
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
               np.dtype(np.float16): "float16"}


class CheckpointError(ValueError):
  """A HF directory that cannot be loaded as Llama 4, with the offending file/tensor named."""


def _read_config(path: Path) -> tuple[Config, dict]:
  f = path / "config.json"
  if not f.is_file():
    raise CheckpointError(f"{f} does not exist")
  try:
    d = json.loads(f.read_text())
    return config_lib.from_hf(d), d
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise CheckpointError(f"{f}: {e}") from e


def _shard_files(path: Path) -> dict[str, Path]:
  """Tensor name -> file, from the index json or the single safetensors file."""
  index = path / INDEX
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: path / fname for name, fname in weight_map.items()}
    for fname in sorted({str(p) for p in files.values()}):
      if not Path(fname).is_file():
        raise CheckpointError(f"{index} names shard {Path(fname).name}, which does not exist in {path}")
    return files
  single = path / SINGLE
  if not single.is_file():
    raise CheckpointError(f"{path} has neither {INDEX} nor {SINGLE}")
  return {name: single for name in _header(single)}


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
  """name -> (dtype, shape) without reading data; safetensors rejects truncated files here."""
  try:
    with safe_open(file, framework="numpy") as f:
      return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e


def _check(files: dict[str, Path], expected: dict[str, tuple], is_fp8: bool) -> dict[str, tuple]:
  """Every tensor's (dtype, shape), after checking names, shapes and dtypes. An FP8 directory may
  hold any 2-D weight in FP8 with its `weight_scale` ([Out, 1] or one value)."""
  headers: dict[str, tuple] = {}
  for file in sorted(set(files.values())):
    headers.update(_header(file))
  if is_fp8:
    expected = dict(expected)
    for name, shape in list(expected.items()):
      scale = headers.get(name + fp8.SCALE)
      if len(shape) == 2 and scale is not None and name + fp8.SCALE not in expected:
        expected[name + fp8.SCALE] = scale[1] if scale[1] in ((shape[0], 1), (1,), ()) else (shape[0], 1)
  fp8_names = {n for n in expected if n + fp8.SCALE in expected}
  missing = sorted(set(expected) - set(headers))
  if missing:
    raise CheckpointError(f"missing tensor(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  unexpected = sorted(n for n in headers if n not in expected)
  if unexpected:
    raise CheckpointError(f"unexpected tensor(s): {unexpected[:5]}")
  for name, (dtype, shape) in sorted(headers.items()):
    allowed = ["F8_E4M3"] if name in fp8_names else sorted(set(DTYPES) - {"F8_E4M3"})
    if dtype not in allowed:
      raise CheckpointError(f"tensor {name} has dtype {dtype}; supported: {allowed}")
    if name in expected and shape != expected[name]:
      raise CheckpointError(f"tensor {name} has shape {shape}, expected {expected[name]}")
  return headers


@functools.lru_cache(maxsize=8)
def _offsets(file: Path) -> tuple[int, dict]:
  with open(file, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    return 8 + n, json.loads(f.read(n))


def _read_raw(file: Path, name: str) -> np.ndarray:
  """One tensor read straight from its byte range (dtypes safetensors' numpy reader lacks)."""
  start, header = _offsets(file)
  entry = header[name]
  begin, end = entry["data_offsets"]
  dtype = np.dtype(DTYPES[entry["dtype"]])
  a = np.fromfile(file, dtype=np.uint8, count=end - begin, offset=start + begin)
  return a.view(dtype).reshape(entry["shape"])


class HFDir(NamedTuple):
  """A checked HF directory: nothing read but headers."""
  cfg: Config
  config: dict                  # config.json as stored
  files: dict[str, Path]        # tensor name -> safetensors file
  prefix: str                   # "language_model." for the multimodal layout, else ""
  headers: dict[str, tuple]     # tensor name -> (safetensors dtype, shape)
  is_fp8: bool                  # the FP8 release's layout (llama4_jax/fp8.py)


def inspect(path) -> HFDir:
  """Checks a HF Llama 4 directory (config, index, every tensor's name, shape and dtype, file
  integrity) without reading tensor data; raises CheckpointError naming what is wrong."""
  path = Path(path)
  cfg, d = _read_config(path)
  try:
    is_fp8 = fp8.is_fp8(d)
  except ValueError as e:
    raise CheckpointError(f"{path / 'config.json'}: {e}") from e
  files = _shard_files(path)
  prefix = convert.layout_prefix(cfg)
  expected = convert.expected_hf_shapes(cfg)
  if is_fp8:
    expected = fp8.expected(expected, cfg.text.num_local_experts)
  headers = _check(files, expected, is_fp8)
  return HFDir(cfg, d, files, prefix, headers, is_fp8)


def reader(d: HFDir, keep_fp8: bool = False, on_read=None):
  """`get(name)` for the bf16 layout's tensor names over `d` (FP8 rebuilt, see fp8.reader). Each
  file is opened per tensor and closed at once, so its pages leave RSS (the streaming converter);
  `on_read(nbytes)` follows each stored tensor read."""
  def get(name: str) -> np.ndarray:
    if d.headers[name][0] == "F8_E4M3":  # safetensors' numpy reader has no float8
      a = _read_raw(d.files[name], name)
    else:
      with safe_open(d.files[name], framework="numpy") as f:
        a = f.get_tensor(name)
    if on_read:
      on_read(a.nbytes)
    return a
  return fp8.reader(get, d.headers, d.cfg.text.num_local_experts, keep_fp8) if d.is_fp8 else get


def load_hf(path, dtype=None, keep_fp8: bool = False) -> tuple[Config, dict]:
  """Reads a HF Llama 4 directory (bf16/fp32, or the FP8 release's layout) -> (Config, params).
  dtype None keeps the stored dtype (FP8 weights dequantize to fp32). With `keep_fp8`, the FP8
  experts stay `quant.FP8Tensor`s (fp8 values, fp32 scales), dequantized a layer at a time."""
  d = inspect(path)
  params = convert.from_hf_tensors(d.cfg, reader(d, keep_fp8))
  cast = (lambda a: jnp.asarray(a)) if dtype is None else (lambda a: jnp.asarray(a, dtype))
  keep = lambda x: isinstance(x, FP8Tensor)
  return d.cfg, jax.tree.map(lambda a: jax.tree.map(jnp.asarray, a) if keep(a) else cast(a),
                             params, is_leaf=keep)


def write_safetensors(out: Path, tensors: dict, max_shard_bytes: int, on_bytes=None) -> None:
  """THE safetensors writer (`save_hf` and the streaming `llama4-convert orbax-to-hf`): `tensors`
  maps name -> (shape, dtype, read), written in that order into shards of at most
  `max_shard_bytes` (a bigger tensor gets a shard of its own), named as transformers names them,
  with the index when there are several. Each `read()` runs once, when its bytes are written, so
  one tensor is in memory at a time; `on_bytes(n)` follows each."""
  codes = {np.dtype(v): k for k, v in DTYPES.items()}
  shards, size = [[]], 0
  for name, (shape, dtype, _) in tensors.items():
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards, size = shards + [[]], 0
    shards[-1].append(name)
    size += n
  files = ([SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for fname, shard in zip(files, shards):
    with open(out / fname, "wb") as f:
      f.write(_safetensors_header([(n, *tensors[n][:2]) for n in shard], codes))
      for name in shard:
        shape, dtype, read = tensors[name]
        a = np.ascontiguousarray(read())
        if a.shape != tuple(shape) or a.dtype != dtype:
          raise CheckpointError(f"{name}: read {a.dtype}{a.shape}, planned {dtype}{shape}")
        f.write(a.view(np.uint8).data)  # raw bytes (bf16 has no buffer format)
        if on_bytes:
          on_bytes(a.nbytes)
  if len(shards) > 1:
    total = sum(int(np.prod(t[0])) * np.dtype(t[1]).itemsize for t in tensors.values())
    weight_map = {n: fname for fname, shard in zip(files, shards) for n in shard}
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=2))


def _safetensors_header(entries: list, codes: dict) -> bytes:
  """The 8-byte length and JSON header of a safetensors file of `entries` (name, shape, dtype)."""
  header, offset = {}, 0
  for name, shape, dtype in entries:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": codes[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  header["__metadata__"] = {"format": "pt"}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw


def save_hf(path, cfg: Config, params: dict, *, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False) -> None:
  """Writes a directory `from_pretrained` loads: `Llama4ForConditionalGeneration`'s layout when
  cfg has a vision tower, else `Llama4ForCausalLM`'s. A non-empty existing `path` is refused
  unless `overwrite`."""
  check_output(path, overwrite=overwrite)
  path = Path(path)
  multimodal = cfg.vision is not None
  if multimodal != ("vision" in params):
    raise CheckpointError(f"cfg.vision is {'set' if multimodal else 'None'} but params "
                          f"{'lack' if multimodal else 'have'} 'vision'; they must describe one model")
  tensors = dict(convert.to_hf_tensors(cfg, params))
  dtypes = {a.dtype for a in tensors.values()}
  bad = [d for d in dtypes if d not in DTYPE_NAMES]
  if bad:
    raise CheckpointError(f"cannot save dtype(s) {bad}; supported: {list(DTYPE_NAMES.values())}")
  dtype = DTYPE_NAMES[max(dtypes, key=lambda d: d.itemsize)]
  hf_config = config_lib.to_hf(cfg, dtype=dtype)
  with atomic_dir(path, overwrite=overwrite) as tmp:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_safetensors(tmp, {n: (a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()},
                      max_shard_bytes)


class OutputError(ValueError):
  """An output path that would destroy data: not empty, or the input itself, inside or above it."""


def check_output(path, sources=(), overwrite: bool = False) -> None:
  """Refuses `path` as an output when it is, lies inside or lies above one of `sources` (never
  allowed), or exists and is not empty (allowed with `overwrite`)."""
  out = Path(path).resolve()
  for src in sources:
    s = Path(src).resolve()
    where = ("is" if out == s else "lies inside" if s in out.parents else
             "lies above" if out in s.parents else None)
    if where:
      raise OutputError(f"output {path} {where} the input {src}: choose another output path")
  if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
    raise OutputError(f"output {path} exists and is not empty (pass --overwrite to replace it)")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _clean_stale(path: Path) -> None:
  """Removes `.NAME.tmp-PID-*` / `.NAME.old-PID-*` folders left beside `path` by a killed writer
  (its pid no longer alive on this host)."""
  for p in path.parent.glob(f".{path.name}.*-*-*"):
    kind, _, rest = p.name[len(path.name) + 2:].partition("-")
    pid = rest.split("-")[0]
    if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def atomic_dir(path: Path, sources=(), overwrite: bool = False):
  """Yields a temporary directory beside `path` that becomes `path` when the block succeeds and
  is removed when it fails: an output appears under its final name only once complete. `path` is
  checked first (`check_output`); temporaries of a killed earlier writer are removed."""
  path = Path(path)
  check_output(path, sources, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  _clean_stale(path)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
  tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output follows the umask
  try:
    yield tmp
    replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(path: Path):
  """Yields a text file that becomes `path` when the block succeeds: written as `path.PID.tmp`
  beside it (hosts sharing a directory each write their own), renamed over it at the end, removed
  on failure. The one way generated files are written."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
  try:
    with tmp.open("w") as f:
      yield f
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def replace_dir(new: Path, path: Path) -> None:
  """Renames `new` to `path`; an existing `path` is removed only once `new` is in place."""
  if not path.exists():
    os.replace(new, path)
    return
  old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
  os.replace(path, old / path.name)
  os.replace(new, path)
  shutil.rmtree(old)
