"""Launch recipes: each engine's file renders for a Scout pod, parses, and starts llama4-train with
arguments that llama4-train accepts; a recipe that does not fit the pod is refused."""
import shlex
import shutil
import subprocess

import pytest
import yaml

from train import config as config_lib, launch
from train.__main__ import make_parser

SCOUT = "configs/scout/pretrain.yaml"
DATA = "data.paths=[/data/shard-00000.arrayrecord]"


def _train_args(command: str, env: dict[str, str]) -> list[str]:
  """The llama4-train command line as the shell would pass it, given the engine's environment."""
  for k, v in env.items():
    command = command.replace(f'"${k}"', v).replace(f"${k}", v)
  words = shlex.split(command.replace("\\\n", " "))
  return words[words.index("llama4-train") + 1:]


def _check_train_args(argv: list[str], hosts: int) -> None:
  args = make_parser().parse_args(argv)
  assert args.config == SCOUT and args.set == [DATA]
  cfg = config_lib.load(args.config, tuple(args.set))
  assert cfg.data.paths == ("/data/shard-00000.arrayrecord",)
  if args.num_processes is not None:
    assert args.num_processes == hosts and 0 <= args.process_id < hosts
  else:
    assert args.distributed


def _bash_syntax_ok(text: str, tmp_path) -> None:
  path = tmp_path / "job.sh"
  path.write_text(text)
  if shutil.which("bash"):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_skypilot_task(monkeypatch):
  monkeypatch.chdir(launch.Path(__file__).parents[1])
  task = yaml.safe_load(launch.render("skypilot", SCOUT, 32, 8, [DATA]))
  assert task["num_nodes"] == 32 and task["resources"]["accelerators"] == "H100:8"
  assert task["name"] == "llama4-scout-pretrain"
  lines = [l for l in task["run"].splitlines() if "COORDINATOR=" not in l]
  argv = _train_args("\n".join(lines), {"COORDINATOR": "10.0.0.1", "SKYPILOT_NUM_NODES": "32",
                                        "SKYPILOT_NODE_RANK": "3"})
  assert argv[argv.index("--coordinator") + 1] == "10.0.0.1:8476"
  _check_train_args(argv, 32)


def test_slurm_batch_script(monkeypatch, tmp_path):
  monkeypatch.chdir(launch.Path(__file__).parents[1])
  text = launch.render("slurm", SCOUT, 32, 8, [DATA], time="2-00:00:00")
  _bash_syntax_ok(text, tmp_path)
  directives = dict((l[len("#SBATCH --"):] + "=").split("=")[:2] for l in text.splitlines()
                    if l.startswith("#SBATCH --"))
  assert directives["nodes"] == "32" and directives["ntasks-per-node"] == "1"
  assert directives["gpus-per-node"] == "8" and directives["time"] == "2-00:00:00"
  assert "exclusive" in directives
  srun = next(l for l in text.splitlines() if l.startswith("srun "))
  _check_train_args(_train_args(srun, {}), 32)


def test_xpk_workload(monkeypatch, tmp_path):
  monkeypatch.chdir(launch.Path(__file__).parents[1])
  text = launch.render("xpk", SCOUT, 64, 4, [DATA], tpu_type="v5p-512", cluster="pod-a")
  _bash_syntax_ok(text, tmp_path)
  words = shlex.split(text[text.index("xpk workload create"):].replace("\\\n", " "))
  opts = dict(zip(words[3::2], words[4::2]))
  assert opts["--tpu-type"] == "v5p-512" and opts["--cluster"] == "pod-a"
  _check_train_args(_train_args(opts["--command"], {}), 64)


def test_recipes_that_do_not_fit_the_pod_are_refused(monkeypatch):
  monkeypatch.chdir(launch.Path(__file__).parents[1])
  with pytest.raises(ValueError, match="multiply to 256, but there are 240 devices"):
    launch.render("xpk", SCOUT, 60, 4)
  with pytest.raises(ValueError, match="not divisible by 24 hosts"):
    launch.render("slurm", SCOUT, 24, 8, ["mesh.fsdp=12"])
  with pytest.raises(ValueError, match=r"axis 'expert' of size 128 is not divisible by mesh axes \('expert',\)"):
    launch.render("slurm", "configs/maverick/pretrain.yaml", 64, 8,
                  ["mesh.fsdp=2", "mesh.expert=256"])
  with pytest.raises(ValueError, match="unknown engine 'k8s'"):
    launch.render("k8s", SCOUT, 32, 8)
  assert launch.main(["slurm", SCOUT, "--hosts", "3", "--devices-per-host", "8"]) == 2
