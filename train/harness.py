"""EleutherAI's lm-evaluation-harness on our model: the `llama4-jax` model class, and
`llama4-eval`, which is the `lm_eval` command with that class registered (lm-eval 0.4 finds
models only in its own registry, so the class must be imported before its CLI parses):

  llama4-eval --model llama4-jax --model_args path=CKPT[,tokenizer=...,max_length=2048] \\
      --batch_size 8 --tasks my_task --include_path tasks/ --output_path out/

`path` is anything `llama4-generate` loads (HF directory, converted checkpoint, training step).
Log-likelihoods run the jitted forward on batches padded to power-of-two lengths (a handful of
shapes compile, not one per request); `loglikelihood_rolling` uses lm-eval's disjoint rolling
windows of `max_length`; `generate_until` runs the KV-cache sampler (`l4.generate`, greedy unless
`temperature` is given) and cuts at the first `until` string.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import llama4_jax as l4
from train import generate, losses, tokenizer as tokenizer_lib


@jax.jit
def _scores(logits_BTV, targets_BT):
  """(log p(target), target is the argmax) at every position."""
  logp = losses.target_logps(logits_BTV, targets_BT)[0]
  return logp, jnp.argmax(logits_BTV, axis=-1) == targets_BT


@register_model("llama4-jax")
class Llama4JaxLM(LM):
  """lm-eval's model interface over `l4.forward` and `l4.generate`."""

  def __init__(self, path: str | None = None, tokenizer: str | None = None, batch_size=8,
               max_length=None, model=None, **_):
    super().__init__()
    if model is None:
      cfg, params, beside = generate.load(path)
      model = (cfg, params, tokenizer_lib.load(tokenizer or beside))
    self.cfg, self.params, self.tok = model
    self.batch = int(batch_size) if str(batch_size).isdigit() else 8
    self.max_length = int(max_length or self.cfg.text.max_position_embeddings)
    self.ids = tokenizer_lib.specials(self.tok)
    self.forward = jax.jit(l4.forward, static_argnums=0)

  @classmethod
  def from_params(cls, cfg: l4.Config, params, tok, **kw) -> "Llama4JaxLM":
    """For a model already in memory (a stage measure)."""
    return cls(model=(cfg, params, tok), **kw)

  def _encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def token_logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), all greedy) per (context ids, continuation ids);
    the context is cut from the left to fit `max_length`."""
    out = []
    for start in range(0, len(pairs), self.batch):
      chunk = pairs[start:start + self.batch]
      rows = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in chunk]
      width = generate.bucket(max(len(r) for r in rows) - 1)
      ids = np.full((self.batch, width + 1), self.ids.pad, np.int32)
      for i, r in enumerate(rows):
        ids[i, :len(r)] = r
      mask = (np.arange(width)[None] < np.asarray([len(r) - 1 for r in rows] +
                                                  [0] * (self.batch - len(rows)))[:, None])
      logits = self.forward(self.cfg, self.params, jnp.asarray(ids[:, :-1]),
                            jnp.asarray(mask.astype(np.int32)))
      logp, greedy = (np.asarray(a) for a in _scores(logits, jnp.asarray(ids[:, 1:])))
      for i, (r, (_, cont)) in enumerate(zip(rows, chunk)):
        span = slice(len(r) - 1 - len(cont), len(r) - 1)
        out.append((float(logp[i, span].sum()), bool(greedy[i, span].all())))
    return out

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [([self.ids.begin, *self._encode(ctx)], self._encode(cont))
             for ctx, cont in (r.args for r in requests)]
    return self.token_logprobs(pairs)

  def loglikelihood_rolling(self, requests) -> list[float]:
    out = []
    for (text,) in (r.args for r in requests):
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          self._encode(text), self.ids.begin, self.max_length, 1)]
      out.append(sum(lp for lp, _ in self.token_logprobs(windows)))
    return out

  def generate_until(self, requests) -> list[str]:
    out = []
    for ctx, kwargs in (r.args for r in requests):
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else until
      gen = generate.Generator(self.cfg, self.params, self.tok,
                               int(kwargs.get("max_gen_toks", 256)),
                               float(kwargs.get("temperature", 0.0)), 1.0)
      (toks,) = gen([[self.ids.begin, *self._encode(ctx)]], [None], jax.random.key(0))
      text = self.tok.decode(toks)
      cut = min((text.find(u) for u in until if u in text), default=len(text))
      out.append(text[:cut])
    return out


def measure(cfg: l4.Config, params, tok, tasks, include_path=None, limit=None,
            batch_size: int = 8) -> dict[str, float]:
  """lm-eval's metrics of a model in memory on `tasks` (names, local task files found under
  `include_path`), as {"lm_eval/TASK/METRIC": value} (stderr left out): a pipeline stage measure."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  lm = Llama4JaxLM.from_params(cfg, params, tok, batch_size=batch_size)
  results = lm_eval.simple_evaluate(
      model=lm, tasks=list(tasks), limit=limit, log_samples=False, bootstrap_iters=0,
      task_manager=TaskManager(include_path=include_path))["results"]
  return {f"lm_eval/{task}/{metric.split(',')[0]}": float(v)
          for task, metrics in sorted(results.items()) for metric, v in sorted(metrics.items())
          if isinstance(v, (int, float)) and "stderr" not in metric}


def main(argv=None) -> int:
  """`lm_eval`'s command line with `llama4-jax` registered."""
  from lm_eval.__main__ import cli_evaluate
  sys.argv = ["llama4-eval", *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()
  return 0


if __name__ == "__main__":
  sys.exit(main())
