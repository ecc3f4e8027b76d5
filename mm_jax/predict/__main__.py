r"""python -m mm_jax.predict: ask a workdir's model about your own images (mm_jax.predict's docstring)."""
import json

import jax
from absl import flags

from mm_jax import cli
from mm_jax.errors import UserError
from mm_jax.eval.sample import Sampling
from mm_jax.predict import predict, questions

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_IMAGE = flags.DEFINE_multi_string("image", [], "An image file (PNG, JPEG, ...); repeat for several.")
_PROMPT = flags.DEFINE_string("prompt", None, "The question; <image> marks where each image goes.")
_INPUT = flags.DEFINE_string("input", None, "A JSONL file of {prompt, image} lines, instead.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line per answer.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; above 0: sample.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens of this total mass.")
_SEED = flags.DEFINE_integer("seed", 0, "The sampling seed.")
_MAX_NEW = flags.DEFINE_integer("max_new", None, "Most tokens per answer (default: model.max_answer_len).")

def main() -> None:
  if not _WORKDIR.value:
    raise UserError("--workdir is required: the training run's workdir")
  try:
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    raise UserError(f"{e}; fix --temperature, --top_k or --top_p") from None
  if _MAX_NEW.value is not None and _MAX_NEW.value < 1:
    raise UserError(f"--max_new={_MAX_NEW.value}: give at least 1 token, or leave it out for "
                    "model.max_answer_len")
  qs = questions(_PROMPT.value, _IMAGE.value, _INPUT.value)
  for r in predict(_WORKDIR.value, qs, _STEP.value, sampling, _SEED.value, _MAX_NEW.value):
    if jax.process_index() == 0:
      print(json.dumps(r, ensure_ascii=False) if _JSON.value else r["prediction"], flush=True)


if __name__ == "__main__":
  cli.run("mm_jax.predict", main)
