"""mm_jax.export: the inverse transforms, the hand-written safetensors (read back by the safetensors
library, sharded with an index), and the round trip through the commands: a tiny random HF model ->
mm_jax.convert -> 20 steps of mm_jax.train -> mm_jax.export -> transformers' from_pretrained, whose
logits equal mm_jax's within 1e-4 and whose generate gives the same 16 greedy tokens (PaliGemma, LLaVA,
Gemma, Llama); families without a Hugging Face counterpart and models not from an import are refused."""
import json
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import hf_tiny
from conftest import REPO, command_env
from mm_jax.convert import export as hf_export
from mm_jax.convert import names
from mm_jax.data import shapes


@pytest.mark.parametrize("entry, shape", [
    (names.Entry("a", "a", "linear"), (6, 4)), (names.Entry("a", "a", "linear", n_in=2), (2, 3, 5)),
    (names.Entry("a", "a", "conv"), (2, 2, 3, 4)), (names.Entry("a", "a", "flat"), (2, 3)),
    (names.Entry("a", "a"), (3, 5)), (names.Entry("a", "a", "linear", part=(1, 3)), (4, 2, 3))])
def test_inverse_undoes_the_import_transform(entry, shape):
  ours = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  hf = hf_export.inverse(entry, ours)
  assert hf.shape[0] * entry.part[1] == entry.hf_shape(shape)[0]
  np.testing.assert_array_equal(entry.transform(hf, shape), ours)


def test_safetensors_written_by_hand_read_back_sharded(tmp_path):
  rng = np.random.default_rng(1)
  arrays = {f"t{i}": rng.normal(size=(i + 1, 3)).astype(np.float32) for i in range(5)}
  arrays["half"] = arrays["t0"].astype(ml_dtypes.bfloat16)
  tensors = [(n, x.shape, x.dtype, lambda x=x: x) for n, x in arrays.items()]
  files = hf_export.write_checkpoint(str(tmp_path), tensors, max_shard_bytes=100)
  assert len(files) > 1
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(arrays)
  for name, x in arrays.items():
    with safe_open(str(tmp_path / index["weight_map"][name]), framework="flax") as f:
      np.testing.assert_array_equal(np.asarray(f.get_tensor(name)), x)
  one = tmp_path / "one"
  one.mkdir()
  assert hf_export.write_checkpoint(str(one), tensors, max_shard_bytes=10**9) == ["model.safetensors"]


def _run(module, *args):
  """One device: the round trip needs no mesh, and 8 simulated devices are slower on a few cores."""
  env = command_env(None)
  return subprocess.run([sys.executable, "-m", f"mm_jax.{module}", *args], cwd=REPO, capture_output=True,
                        text=True, check=False, env=env)


def _fine_tuned(hf_model, tmp, test_config, steps=20, tokenizer_json=False, extra=()):
  """save_pretrained -> convert -> `steps` steps of train on the test data (its tokenizer copied in as
  the model's, as test_cli does; or a Llama-3-style tokenizer.json) -> export; returns (fine-tuned
  workdir, export dir)."""
  hf_dir = hf_tiny.save(hf_model, tmp / "hf")
  if tokenizer_json:
    from test_tokenizer import byte_bpe_dir  # pylint: disable=g-import-not-at-top
    byte_bpe_dir(tmp / "hf")
  else:
    shutil.copy(shapes.tokenizer_path(shapes.build(test_config.data)), tmp / "hf" / "tokenizer.model")
  out, ft, exp = tmp / "import", tmp / "ft", tmp / "exported"
  r = _run("convert", f"--hf_dir={hf_dir}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  d = test_config.data
  r = _run("train", f"--config={out}/config.py", f"--workdir={ft}", f"--config.data.data_dir={d.data_dir}",
           f"--config.data.num_train={d.num_train}", f"--config.data.num_validation={d.num_validation}",
           f"--config.data.num_test={d.num_test}", f"--config.data.text_len={d.text_len}",
           "--config.data.caption_ratio=0", f"--config.total_steps={steps}", "--config.global_batch_size=8",
           f"--config.log_every={steps}", f"--config.checkpoint_every={steps}", "--config.optim.lr=3e-3",
           *extra)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run("export", f"--workdir={ft}", f"--out={exp}")
  assert r.returncode == 0, r.stderr[-3000:]
  return ft, exp


def _moved(hf_model, exported) -> float:
  a, b = hf_model.state_dict(), exported.state_dict()
  assert set(a) == set(b)
  return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # convert, train and export through the commands
@pytest.mark.parametrize("family", ["paligemma", "llava", "mllama"])
def test_round_trip_vlm(family, test_config, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  parity = __import__(f"test_parity_{family}")
  hf = parity.build()
  ft, exp = _fine_tuned(hf, tmp_path, test_config)
  back = transformers.AutoModelForImageTextToText.from_pretrained(str(exp)).eval()
  assert type(back) is type(hf) and _moved(hf, back) > 1e-3  # fine-tuning moved the weights
  parity.test_logits_and_bfloat16((back, str(ft)))  # logits within 1e-4 of mm_jax's fine-tuned model
  parity.test_greedy_16_tokens((back, str(ft)))     # HF generate = our greedy, 16 tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_round_trip_lm(family, test_config, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  hf = __import__(f"test_parity_{family}").build()
  ft, exp = _fine_tuned(hf, tmp_path, test_config)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(exp)).eval()
  assert type(back) is type(hf) and _moved(hf, back) > 1e-3
  r = hf_tiny.compare_lm(back, str(ft), 256)
  assert r["max_diff"] <= 1e-4 and r["greedy"][0] == r["greedy"][1], r


@pytest.mark.slow
def test_round_trip_with_a_tokenizer_json(test_config, tmp_path):
  """A Llama whose tokenizer is a tokenizer.json (no SentencePiece model, as Llama 3 ships): the import
  names it as data.tokenizer, training tokenizes with it, and the export writes it back for
  AutoTokenizer, which encodes as ours does."""
  import transformers  # pylint: disable=g-import-not-at-top
  from mm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  parity = __import__("test_parity_llama")
  config = parity.build().config
  config.vocab_size = 1024  # the byte-level tokenizer's 800 ids fit
  hf = hf_tiny.build(transformers.LlamaForCausalLM, config)
  ft, exp = _fine_tuned(hf, tmp_path, test_config, tokenizer_json=True,
                        extra=["--config.data.chat_template=llama3",  # its header and <|image|> tokens
                               "--config.data.text_len=48"])  # the headers take tokens
  assert hf_tiny.load_config(str(ft)).data.tokenizer.endswith("hf/tokenizer.json")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(exp)).eval()
  r = hf_tiny.compare_lm(back, str(ft), 1024)
  assert r["max_diff"] <= 1e-4 and r["greedy"][0] == r["greedy"][1], r
  text = "what color is the circle? red"
  ours = tokenizer_lib.load(str(exp / "tokenizer.json")).encode(text)
  assert transformers.AutoTokenizer.from_pretrained(str(exp)).encode(text, add_special_tokens=False) == ours


def _params_only_workdir(workdir, config, vocab: int) -> None:
  """A workdir whose checkpoint holds `config`'s freshly initialised params (no training needed)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mm_jax.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top
  from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mm_jax.train.state import ModelOnMesh  # pylint: disable=g-import-not-at-top
  mm = ModelOnMesh.create(config, vocab, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  ckpt = Checkpoints(str(workdir))
  ckpt.save_params(0, mm.init_params(0), config)
  ckpt.wait()
  ckpt.close()


@pytest.mark.slow  # each case one command
def test_refusals_are_one_line(test_config, tmp_path):
  """Through the command: a model not from an import, and a family with no HF counterpart."""
  import copy  # pylint: disable=g-import-not-at-top
  for family in ("unified", "hybrid"):
    config = copy.deepcopy(test_config)
    config.model.family = family
    config.mesh.data = 1
    _params_only_workdir(tmp_path / family, config, 128)
    r = _run("export", f"--workdir={tmp_path / family}", f"--out={tmp_path / 'x'}")
    lines = r.stderr.strip().splitlines()
    said = "does not descend from a Hugging Face import" if family == "unified" else "the hybrid family has no"
    assert r.returncode == 1 and len(lines) == 1 and said in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["paligemma", "llava", "gemma", "siglip"])  # mllama: its round trip
def test_import_then_export_gives_back_the_same_tensors(family, tmp_path):
  """convert, then export at once: from_pretrained of the export holds bitwise HF's original tensors
  (SiglipModel included, its MAP head's packed q/k/v put back together)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from mm_jax import export  # pylint: disable=g-import-not-at-top
  from mm_jax.convert import convert  # pylint: disable=g-import-not-at-top
  if family == "siglip":
    config = transformers.SiglipConfig(
        vision_config=hf_tiny.SIGLIP_VISION,
        text_config=dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, projection_size=32))
    hf = hf_tiny.build(transformers.SiglipModel, config)
  else:
    hf = __import__(f"test_parity_{family}").build()
  convert(hf_tiny.save(hf, tmp_path / "hf"), str(tmp_path / "out"))
  export.export(str(tmp_path / "out"), str(tmp_path / "exported"))
  back = type(hf).from_pretrained(str(tmp_path / "exported"))
  a, b = hf.state_dict(), back.state_dict()
  assert set(a) == set(b)
  assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_lineage_follows_whole_model_parts_back_to_the_import(tmp_path):
  """stage 2 <- stage 1 <- the import (parts '' -> ''): found; an encoder and a decoder from two runs
  (prefixed parts), or no import at all: refused in one line."""
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  from mm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  imp = tmp_path / "import"
  (imp / hf_export.HF_DIR).mkdir(parents=True)
  (imp / hf_export.HF_DIR / hf_export.TENSORS).write_text("{}")
  cfg = lambda *parts: mlc.ConfigDict({"init": {"parts": tuple(parts)}})
  stored = {str(tmp_path / "stage1"): cfg((str(imp), "", "")), str(imp): cfg((str(imp), "", ""))}
  look = lambda root: stored[str(root)]
  stage2 = cfg((str(tmp_path / "stage1"), "", ""))
  assert hf_export.lineage(str(tmp_path / "stage2"), stage2, look) == str(imp / hf_export.HF_DIR)
  composed = cfg((str(tmp_path / "stage1"), "encoder/", "encoder/"), (str(imp), "decoder/", "decoder/"))
  with pytest.raises(UserError, match="does not descend from a Hugging Face import as a whole model"):
    hf_export.lineage(str(tmp_path / "mine"), composed, look)
