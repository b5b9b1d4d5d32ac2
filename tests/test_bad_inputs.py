"""Bad recipes, data, CLI arguments and model inputs: each is refused with one line naming the
culprit (exit code 2 for the commands), before anything is written; nothing on disk changes.

Checkpoint and training faults (corruption, divergence, signals, concurrent runs) are in
test_faults.py; conversion outputs in test_bad_outputs.py.
"""
import json

import numpy as np
import pytest
import yaml

from guard_util import one_line_error, snapshot
from train import __main__ as train_main
from train_util import TINY


@pytest.fixture
def recipe(tmp_path):
  """A valid tiny recipe whose workdir must never appear when the run is refused."""
  d = yaml.safe_load(yaml.safe_dump(TINY))
  d["workdir"] = str(tmp_path / "work")
  path = tmp_path / "r.yaml"
  path.write_text(yaml.safe_dump(d))
  return path


def _refused(capsys, tmp_path, argv, culprit: str, prog="llama4-train", main=train_main.main):
  before = snapshot(tmp_path)
  assert main([str(a) for a in argv]) == 2
  line = one_line_error(capsys.readouterr().err, prog)
  assert culprit in line, line
  assert snapshot(tmp_path) == before, "a refused command changed files"
  return line


# ---- recipes: every field's range, checked before anything is created -------------------------

BAD_FIELDS = [
    ("steps=0", "run.steps=0"),
    ("steps=-5", "run.steps=-5"),
    ("log_every=0", "run.log_every"),
    ("seed=-1", "run.seed"),
    ("peak_flops_per_device=-1", "run.peak_flops_per_device"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.seq_len=1", "data.seq_len"),
    ("data.packing_bins=0", "data.packing_bins"),
    ("optim.lr=.nan", "optim.lr=nan"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=.inf", "optim.lr=inf"),
    ("optim.lr=0", "optim.lr"),
    ("optim.eps=0", "optim.eps"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.decay_steps=-3", "optim.decay_steps"),
    ("optim.b1=1.0", "optim.b1"),
    ("optim.b2=1.5", "optim.b2"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.clip_norm=-1", "optim.clip_norm"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.z_loss=-1", "optim.z_loss"),
    ("optim.load_balance=-1", "optim.load_balance"),
    ("optim.skip_nonfinite=-1", "optim.skip_nonfinite"),
    ("optim.grad_accum=0", "optim.grad_accum"),
    ("optim.grad_accum=3", "optim.grad_accum=3"),
    ("optim.schedule=linear", "optim.schedule"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.every=0", "checkpoint.every"),
    ("mesh.data=0", "mesh axis sizes"),
    ("mesh.data=3", "there are 8 devices"),
    ("mesh.expert_dispatch=gather", "mesh.expert_dispatch='gather': expected all_to_all"),
    ("mesh.expert_capacity=0.5", "mesh.expert_capacity=0.5: must be >= 1"),
    ("model.preset=huge", "model.preset"),
    ("model.compute_dtype=float16", "model.compute_dtype"),
    ("model.text.hidden_sizes=64", "hidden_sizes"),
    ("optim.learning_rate=1", "learning_rate"),
    ("steps=abc", "steps: expected int"),
    ("lora.rank=0", "lora.rank"),
    ("dpo.beta=0", "dpo.beta"),
    ("rl.group_size=1", "rl.group_size"),
]


@pytest.mark.parametrize("override,culprit", BAD_FIELDS, ids=[o for o, _ in BAD_FIELDS])
def test_a_bad_recipe_field_is_one_line_naming_it(capsys, tmp_path, recipe, override, culprit):
  _refused(capsys, tmp_path, [recipe, "--set", override], culprit)


def test_data_weights_are_checked(capsys, tmp_path, recipe):
  for path in ("a.jsonl", "b.jsonl"):
    (tmp_path / path).write_text('{"text": "x"}\n')
  paths = f"data.paths=[{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}]"
  for weights, culprit in (("[1, -1]", "data.weights[1]"), ("[0, 0]", "data.weights"),
                           ("[1]", "data.weights has 1 entries for 2")):
    _refused(capsys, tmp_path, [recipe, "--set", "data.synthetic=null", "--set", paths,
                                "--set", f"data.weights={weights}"], culprit)


def test_unparsable_recipes_and_overrides(capsys, tmp_path, recipe):
  broken = tmp_path / "broken.yaml"
  broken.write_text("steps: 3\noptim: {lr: [1,\n")
  _refused(capsys, tmp_path, [broken], f"{broken}:")
  _refused(capsys, tmp_path, [tmp_path / "missing.yaml"], "missing.yaml")
  _refused(capsys, tmp_path, [recipe, "--set", "optim.lr"], "--set expects key.path=value")
  _refused(capsys, tmp_path, [recipe, "--set", "optim.lr=[1,"], "--set optim.lr")
  _refused(capsys, tmp_path, [recipe, "--set", "steps.x=1"], "steps")


def test_missing_inputs_are_named_before_the_workdir_is_made(capsys, tmp_path, recipe):
  not_a_tokenizer = tmp_path / "tok.json"
  not_a_tokenizer.write_text("{not json")
  cases = [
      (["model.init_from_hf=" + str(tmp_path / "nohf")], "nohf"),
      (["model.init_from_checkpoint=" + str(tmp_path / "nockpt")], "model.init_from_checkpoint"),
      (["data.tokenizer=" + str(tmp_path / "none.json")], "none.json"),
      (["data.tokenizer=" + str(not_a_tokenizer)], "tok.json"),
      (["data.synthetic=null", f"data.paths=[{tmp_path / 'gone.jsonl'}]"], "gone.jsonl"),
      (["data.synthetic=null", f"data.paths=[{recipe}]"], "unknown format"),
      (["data.synthetic=null"], "data.paths is empty"),
  ]
  for overrides, culprit in cases:
    _refused(capsys, tmp_path, [recipe, *sum((["--set", o] for o in overrides), [])], culprit)


def test_debug_shows_the_traceback(tmp_path, recipe):
  with pytest.raises(ValueError, match="run.steps"):
    train_main.main([str(recipe), "--set", "steps=0", "--debug"])


# ---- data: every source's records checked up front, named file:line -----------------------------

def _data_refused(capsys, tmp_path, recipe, name: str, content: str, culprit: str, **extra):
  path = tmp_path / name
  path.write_text(content)
  overrides = ["--set", "data.synthetic=null", "--set", f"data.paths=[{path}]"]
  for k, v in extra.items():
    overrides += ["--set", f"{k.replace('__', '.')}={v}"]
  return _refused(capsys, tmp_path, [recipe, *overrides], culprit)


TEXT_RECORDS = [
    ('{"text": "ok"}\n{"text": null}\n', "t.jsonl:2: 'text' must be a string, got NoneType"),
    ('{"text": 12345}\n', "t.jsonl:1: 'text' must be a string, got int"),
    ('', "holds no records"),
    ('\n\n', "holds no records"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": \n', "t.jsonl:3: not JSON"),
    ('["text"]\n', "t.jsonl:1: expected a JSON object"),
    ('{"txt": "a"}\n', "t.jsonl:1: expected a JSON object with a 'text' field"),
]


@pytest.mark.parametrize("content,culprit", TEXT_RECORDS)
def test_bad_text_records(capsys, tmp_path, recipe, content, culprit):
  _data_refused(capsys, tmp_path, recipe, "t.jsonl", content, culprit)


def test_bad_parquet_and_arrayrecord_sources(capsys, tmp_path, recipe):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter
  pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
  pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
  pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
  writer = ArrayRecordWriter(str(tmp_path / "bad.arrayrecord"), "group_size:1")
  for record in (b'{"text": "fine"}', b"plain text", b"\xff\xfe not utf-8"):
    writer.write(record)
  writer.close()
  for name, culprit in (("nocol.parquet", "cannot read a 'text' column"),
                        ("null.parquet", "null.parquet: row 1: 'text' must be a string"),
                        ("empty.parquet", "holds no records"),
                        ("bad.arrayrecord", "bad.arrayrecord: record 2: expected UTF-8")):
    _refused(capsys, tmp_path, [recipe, "--set", "data.synthetic=null", "--set",
                                f"data.paths=[{tmp_path / name}]"], culprit)


def _chat(*messages):
  return json.dumps({"messages": [dict(zip(("role", "content"), m)) for m in messages]}) + "\n"


CHAT_RECORDS = [
    (_chat(("user", "hi"), ("robot", "x")), "c.jsonl:1: message 1 must have a role"),
    (_chat(("user", 7), ("assistant", "x")), "c.jsonl:1: message 0"),
    (_chat(("user", "hi")), "c.jsonl:1: no assistant turn"),
    ('{"messages": []}\n', "c.jsonl:1: expected {'messages'"),
    ('', "holds no records"),
]


@pytest.mark.parametrize("content,culprit", CHAT_RECORDS)
def test_bad_chat_records(capsys, tmp_path, recipe, content, culprit):
  _data_refused(capsys, tmp_path, recipe, "c.jsonl", content, culprit, data__chat="true")


PAIR_RECORDS = [
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}\n', "p.jsonl:1: chosen and rejected are the same"),
    ('{"prompt": "q", "chosen": "a"}\n', "p.jsonl:1: expected {'prompt', 'chosen', 'rejected'}"),
    ('{"prompt": "q", "chosen": null, "rejected": "b"}\n', "p.jsonl:1: an empty preference pair"),
]


@pytest.mark.parametrize("content,culprit", PAIR_RECORDS)
def test_bad_preference_pairs(capsys, tmp_path, recipe, content, culprit):
  _data_refused(capsys, tmp_path, recipe, "p.jsonl", content, culprit, dpo__beta="0.1")


PROMPT_RECORDS = [
    ('{"prompt": "1+1=", "answer": null}\n', "q.jsonl:1: 'answer' must be"),
    ('{"prompt": "1+1="}\n', "q.jsonl:1: expected {'prompt', 'answer'}"),
    ('{"prompt": 5, "answer": "2"}\n', "q.jsonl:1: 'prompt' must be a string or a list"),
    ('{"prompt": [{"role": "user"}], "answer": "2"}\n', "q.jsonl:1: message 0 must have"),
]


@pytest.mark.parametrize("content,culprit", PROMPT_RECORDS)
def test_bad_rl_prompts(capsys, tmp_path, recipe, content, culprit):
  _data_refused(capsys, tmp_path, recipe, "q.jsonl", content, culprit, rl__group_size="2")


IMAGE_RECORDS = [
    ('{"text": null, "images": []}\n', "m.jsonl:1: 'text' must be a string"),
    ('{"text": "<|image|> a", "images": ["nope.png"]}\n', "m.jsonl:1: image 'nope.png' is not a file"),
    ('{"text": "<|image|> a", "images": []}\n', "m.jsonl:1: the text has 1"),
    ('{"text": "a", "images": [3]}\n', "m.jsonl:1: the text has 0"),
]


@pytest.mark.parametrize("content,culprit", IMAGE_RECORDS)
def test_bad_image_text_records(capsys, tmp_path, recipe, content, culprit):
  _data_refused(capsys, tmp_path, recipe, "m.jsonl", content, culprit,
                model__preset="tiny_multimodal", model__multimodal="true", model__text="{}")


# ---- the other commands ------------------------------------------------------------------------

def test_plan_and_launch_arguments(capsys, tmp_path, recipe):
  from train import launch, plan
  for argv, culprit in (([recipe, "--devices", "0"], "--devices must be in"),
                        ([recipe, "--devices", "-3"], "--devices must be in")):
    with pytest.raises(SystemExit) as e:
      plan.main([str(a) for a in argv])
    assert e.value.code == 2
    assert culprit in one_line_error(capsys.readouterr().err, "llama4-plan")
  for argv, culprit in ((["slurm", recipe, "--hosts", "0", "--devices-per-host", "8"], "--hosts"),
                        (["slurm", recipe, "--hosts", "2", "--devices-per-host", "0"],
                         "--devices-per-host")):
    with pytest.raises(SystemExit) as e:
      launch.main([str(a) for a in argv])
    assert e.value.code == 2
    assert culprit in one_line_error(capsys.readouterr().err, "llama4-launch")
  args = ["slurm", recipe, "--hosts", "2", "--devices-per-host", "4"]
  _refused(capsys, tmp_path, [*args, "--set", "mesh.data=3"], "mesh", "llama4-launch", launch.main)
  _refused(capsys, tmp_path, [*args, "--set", "steps=0"], "run.steps", "llama4-launch", launch.main)
  _refused(capsys, tmp_path, [*args, "-o", recipe], "is the input", "llama4-launch", launch.main)
  out = tmp_path / "job.sbatch"
  out.write_text("mine")
  _refused(capsys, tmp_path, [*args, "-o", out], "--overwrite", "llama4-launch", launch.main)
  assert launch.main([str(a) for a in args] + ["-o", str(out), "--overwrite"]) == 0
  assert "llama4-train" in out.read_text()


def test_train_without_a_recipe_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    train_main.main([])
  assert e.value.code == 2
  assert "a CONFIG.yaml is required" in capsys.readouterr().err


# ---- the model API ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  import jax
  import llama4_jax as l4
  cfg = l4.presets.tiny()
  return cfg, l4.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("bad", [-1, -272, 272, 10**6])
def test_out_of_range_token_ids_raise_or_read_nan(tiny, bad):
  import jax.numpy as jnp
  import llama4_jax as l4
  from conftest import apply_jit
  cfg, params = tiny
  ids = np.full((2, 6), 5)
  ids[0, 3] = bad
  with pytest.raises(ValueError, match=f"input_ids contain \\[{bad}\\] outside the vocabulary"):
    l4.forward(cfg, params, ids)
  logits = np.asarray(apply_jit(cfg, params, jnp.asarray(ids)).logits)
  # the bad row reads NaN (attention spreads it over the row); the other row is untouched
  assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()


def test_kv_cache_overflow_raises_or_reads_nan(tiny):
  import jax.numpy as jnp
  import llama4_jax as l4
  from conftest import extend_jit
  cfg, params = tiny
  cache = l4.init_cache(cfg, batch=1, max_len=8)
  _, cache = l4.extend(cfg, params, cache, jnp.ones((1, 6), jnp.int32))
  with pytest.raises(ValueError, match="6 cached \\+ 3 new tokens exceed the cache's max_len 8"):
    l4.extend(cfg, params, cache, jnp.ones((1, 3), jnp.int32))
  ok, _ = extend_jit(cfg, params, cache, jnp.ones((1, 2), jnp.int32))
  over, _ = extend_jit(cfg, params, cache, jnp.ones((1, 3), jnp.int32))
  assert np.isfinite(np.asarray(ok)).all() and np.isnan(np.asarray(over)).all()
