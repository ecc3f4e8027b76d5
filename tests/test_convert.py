"""mm_jax.convert on bad input: a missing, an unexpected or a mis-shaped tensor, an unsupported
architecture or field, an OUT that holds a checkpoint: a UserError naming it, and OUT left as it was.
And the command line: one line and a non-zero exit on error; on success a workdir that eval and train
load (its config.py through config_flags)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import hf_tiny
from conftest import REPO, command_env
from mm_jax.convert import convert
from mm_jax.data import shapes
from mm_jax.data.tokenizer import Tokenizer
from mm_jax.errors import UserError

pytestmark = pytest.mark.slow  # end to end through the commands


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Tiny saved Llama and LLaVA checkpoints (never modified: tests copy them)."""
  tmp = tmp_path_factory.mktemp("hf")
  text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
  llama = hf_tiny.build(transformers.LlamaForCausalLM, transformers.LlamaConfig(**text))
  llava = hf_tiny.build(transformers.LlavaForConditionalGeneration, transformers.LlavaConfig(
      vision_config=dict(hf_tiny.SIGLIP_VISION, vision_use_head=False),
      text_config=dict(text, model_type="llama"), image_token_index=250,
      image_seq_length=hf_tiny.N_PATCHES, vision_feature_select_strategy="full"))
  return {"llama": hf_tiny.save(llama, tmp / "llama"), "llava": hf_tiny.save(llava, tmp / "llava")}


def _copy(src, tmp_path, edit_tensors=None, edit_config=None) -> str:
  dst = str(tmp_path / "hf")
  shutil.copytree(src, dst)
  if edit_tensors:
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit_tensors(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
  if edit_config:
    with open(os.path.join(dst, "config.json")) as f:
      config = json.load(f)
    edit_config(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(config, f)
  return dst


def _set(key, value):
  def edit(d):
    *parents, leaf = key.split(".")
    for k in parents:
      d = d[k]
    d[leaf] = value
  return edit


BAD = {
    "missing tensor": ("llama", dict(edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "tensor model.layers.1.mlp.up_proj.weight (for decoder/block_1/up/kernel) is missing"),
    "unexpected tensor": ("llama", dict(edit_tensors=lambda t: t.update(
        {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})),
                          "unexpected tensor model.layers.0.self_attn.q_norm.weight"),
    "shape mismatch": ("llama", dict(edit_config=_set("num_key_value_heads", 1)),
                       "tensor model.layers.0.self_attn.k_proj.weight"),
    "unsupported architecture": ("llama", dict(edit_config=_set("architectures", ["Gemma2ForCausalLM"])),
                                 "architectures[0]='Gemma2ForCausalLM' is not supported"),
    "Mllama with a SigLIP tower": ("llava", dict(edit_config=_set("architectures",
                                                                  ["MllamaForConditionalGeneration"])),
                                   "vision_config.model_type='siglip_vision_model' is not supported"),
    "CLIP tower": ("llava", dict(edit_config=_set("vision_config.model_type", "clip_vision_model")),
                   "vision_config.model_type='clip_vision_model'"),
    "CLS-dropping strategy": ("llava", dict(edit_config=_set("vision_feature_select_strategy", "default")),
                              "vision_feature_select_strategy='default'"),
    "other rope": ("llama", dict(edit_config=_set("rope_parameters", {"rope_type": "yarn", "factor": 2.0})),
                   "rope_parameters.rope_type='yarn'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_it_and_writes_nothing(name, hf_dirs, tmp_path):
  family, edits, expected = BAD[name]
  hf_dir = _copy(hf_dirs[family], tmp_path, **edits)
  out = tmp_path / "out"
  with pytest.raises(UserError, match=None) as e:
    convert(hf_dir, str(out))
  assert expected in str(e.value), str(e.value)
  assert not out.exists()


def test_out_with_a_checkpoint_is_refused_and_left_alone(hf_dirs, tmp_path):
  out = tmp_path / "out"
  convert(hf_dirs["llama"], str(out))
  before = sorted(p.stat().st_mtime_ns for p in out.rglob("*"))
  with pytest.raises(UserError, match="--out=.* already holds a checkpoint"):
    convert(hf_dirs["llama"], str(out))
  assert sorted(p.stat().st_mtime_ns for p in out.rglob("*")) == before


def test_bfloat16_import_and_known_leftovers(hf_dirs, tmp_path):
  """--dtype=bfloat16 stores bfloat16 params; an old checkpoint's rotary inv_freq buffers are skipped."""
  hf_dir = _copy(hf_dirs["llama"], tmp_path, edit_tensors=lambda t: t.update(
      {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
  config = convert(hf_dir, str(tmp_path / "out"), dtype="bfloat16")
  assert config.model.dtype == config.model.param_dtype == "bfloat16"
  _, params = hf_tiny.ours(str(tmp_path / "out"))
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_sharded_checkpoint_and_hub_layout(hf_dirs, tmp_path):
  """model.safetensors.index.json over two files, with LLaVA's in-memory (model.language_model.*) names."""
  src = load_file(os.path.join(hf_dirs["llava"], "model.safetensors"))
  rename = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
            "vision_tower.": "model.vision_tower.vision_model."}
  tensors = {}
  for name, x in src.items():
    old = next((p for p in rename if name.startswith(p)), "")
    tensors[rename.get(old, "") + name[len(old):]] = x
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  shutil.copy(os.path.join(hf_dirs["llava"], "config.json"), hf_dir)
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
    file = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, str(hf_dir / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  convert(str(hf_dir), str(tmp_path / "out"))
  model, params = hf_tiny.ours(str(tmp_path / "out"))
  np.testing.assert_array_equal(params["decoder"]["head"]["kernel"], src["language_model.lm_head.weight"].T)


def _run(*args):
  env = command_env()
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=240)


def test_cli_error_is_one_line_and_nonzero(hf_dirs, tmp_path):
  hf_dir = _copy(hf_dirs["llama"], tmp_path, edit_config=_set("architectures", ["Gemma2ForCausalLM"]))
  r = _run("mm_jax.convert", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out'}")
  assert r.returncode != 0
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("mm_jax.convert: error: config.json: architectures[0]='Gemma2ForCausalLM'")
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "out").exists()


def test_cli_then_eval_and_train_load_the_workdir(test_config, tmp_path):
  # The dataset's own SentencePiece model stands in for the checkpoint's, and the model's vocabulary is
  # exactly its pieces (eval decodes every predicted id).
  tokenizer = shapes.tokenizer_path(shapes.build(test_config.data))
  vocab = Tokenizer.load(tokenizer).vocab_size
  llava = hf_tiny.build(transformers.LlavaForConditionalGeneration, transformers.LlavaConfig(
      vision_config=dict(hf_tiny.SIGLIP_VISION, vision_use_head=False),
      text_config=dict(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4),
      image_token_index=vocab - 1, image_seq_length=hf_tiny.N_PATCHES,
      vision_feature_select_strategy="full"))
  hf_dir = hf_tiny.save(llava, tmp_path / "hf")
  shutil.copy(tokenizer, os.path.join(hf_dir, "tokenizer.model"))
  out = tmp_path / "out"
  r = _run("mm_jax.convert", f"--hf_dir={hf_dir}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert (out / "tokenizer.model").is_file()
  data = [f"--config.data.{k}={test_config.data[k]}" for k in
          ("data_dir", "num_train", "num_validation", "num_test")]
  r = _run("mm_jax.eval", f"--config={out}/config.py", f"--workdir={out}", "--config.eval.batch_size=8",
           *data)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "vqa_exact_match" in r.stdout
  r = _run("mm_jax.train", f"--config={out}/config.py", f"--workdir={tmp_path / 'new'}",
           "--config.total_steps=1", "--config.global_batch_size=8", *data)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"from {out} (step 0)" in r.stdout
