"""A new family is one module plus one registry line: a toy family defined here alone trains a step, is
counted by the FLOP counter and checked by the validator, with no other file changed. The same for a
connector."""
import copy
import dataclasses
import json

import flax.linen as nn
import ml_collections as mlc
import pytest

from mm_jax import models
from mm_jax.config import fields, validate
from mm_jax.errors import UserError
from mm_jax.models import connectors, family
from mm_jax.models.flop_count import Sizes, Tally
from mm_jax.models.layers import dense, partitioned
from mm_jax.perf import flops
from mm_jax.train import optim
from mm_jax.train.loop import train


# --- the toy family: what a new family's module holds ---

@dataclasses.dataclass(frozen=True)
class ToyOptions:
  """model.family_options.toy."""
  patch: int = 8  # the image is cut into patch x patch squares, mean-pooled into one token


class Toy(nn.Module):
  """Mean-pooled image patches projected to one vector, added to every text embedding; a linear head."""
  width: int
  vocab_size: int
  patch: int
  task = "vqa"

  def num_image_tokens(self, image_shape) -> int:
    del image_shape
    return 0  # the image is added to the text embeddings, not put in the sequence

  @nn.compact
  def __call__(self, image_BxHxWxC, text_BxT, mask_ar_BxT, mask_input_BxT, image_pos=None, segment=None,
               positions=None):
    del mask_ar_BxT, mask_input_BxT, image_pos, segment, positions  # one image, added to every token
    if image_BxHxWxC.ndim == 5:  # the rows layout: image slot 0
      image_BxHxWxC = image_BxHxWxC[:, 0]
    p, (b, h, w, c) = self.patch, image_BxHxWxC.shape
    patches_BxNxF = image_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    img_BxD = dense(self.width, (None, "embed"), "image_proj")(patches_BxNxF.reshape(b, -1, p * p * c)
                                                                .mean(axis=1))
    table_VxD = self.param("embed", partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                           (self.vocab_size, self.width))
    x_BxTxD = table_VxD[text_BxT] + img_BxD[:, None]
    return dense(self.vocab_size, ("embed", "vocab"), "head")(x_BxTxD)

  def count_flops(self, t: Tally, sizes: Sizes, batch: int, images_per_row: int | None = None) -> None:
    t.source("img")
    t.dense("encoder", "image_proj", "img", "img", batch, self.patch ** 2 * 3, self.width)
    t.ew("x", ["img"], ["embed"])
    t.dense("head", "head", "x", "logits", batch * sizes.text_len, self.width, self.vocab_size)


def build(model_cfg, tokenizer_vocab: int) -> Toy:
  opts = family.family_options(model_cfg, "toy", ToyOptions)
  return Toy(model_cfg.decoder.width, tokenizer_vocab, opts.patch)


def check(config) -> None:
  patch = fields.integer(config, "model.family_options.toy.patch", 1)
  if config.data.image_size % patch:
    raise UserError(f"model.family_options.toy.patch={patch} must divide data.image_size")


TOY = family.Family(build, check, options=ToyOptions)


@pytest.fixture
def toy(monkeypatch, test_config):
  monkeypatch.setitem(models.FAMILIES, "toy", TOY)  # the registry line
  config = copy.deepcopy(test_config)
  config.model.family = "toy"
  config.model.family_options.toy = mlc.ConfigDict(dict(patch=8))
  config.update(dict(total_steps=1, log_every=1, checkpoint_every=1))
  return config


@pytest.mark.slow  # trains end to end
def test_a_toy_family_trains_is_counted_and_checked(toy, tmp_path):
  metrics = train(toy, str(tmp_path))
  assert metrics["loss"] > 0
  saved = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert saved["step"] == 1

  model = models.build_model(toy.model, 128)
  params = validate.abstract_params(toy, model)
  labels = optim.param_labels(params, toy.optim.rules)
  b, t, d, v = toy.global_batch_size, toy.data.text_len, 32, 128
  assert params["embed"].shape == (v, d)
  forward = 2 * b * 8 * 8 * 3 * d + 2 * b * t * d * v
  counted = flops.train_flops(toy, params, labels)
  assert counted["forward"] == forward
  assert counted["backward"] == 2 * b * 8 * 8 * 3 * d + 2 * (2 * b * t * d * v)  # dW; dW and dX
  frozen = optim.param_labels(params, (("image_proj/.*", "frozen"), (".*", "trainable")))
  assert flops.train_flops(toy, params, frozen)["backward"] == 2 * (2 * b * t * d * v)

  toy.model.family_options.toy.patch = 5
  with pytest.raises(UserError, match=r"model.family_options.toy.patch=5 must divide data.image_size"):
    validate.check_fields(toy)
  toy.model.family_options.toy.patch, toy.model.family_options.toy.size = 8, 3
  with pytest.raises(UserError, match=r"model.family_options.toy.size is not a field of ToyOptions"):
    models.build_model(toy.model, 128)


class Mean(nn.Module):
  """A one-token connector: the patch features' mean, projected."""
  width: int
  dtype: object = None
  param_dtype: object = None

  def num_tokens(self, num_patches: int) -> int:
    del num_patches
    return 1

  @nn.compact
  def __call__(self, x_BxPxE):
    return dense(self.width, (None, "embed"), "proj")(x_BxPxE.mean(axis=1, keepdims=True))

  def count_flops(self, t: Tally, pre: str, x: str, n: int, patches: int, e: int) -> int:
    del patches
    t.dense(pre, f"{pre}/proj", x, x, n, e, self.width)
    return 1


@pytest.mark.slow  # trains end to end
def test_a_new_connector_is_one_class_and_one_registry_line(monkeypatch, test_config, tmp_path):
  monkeypatch.setitem(connectors.CONNECTORS, "mean", Mean)
  config = copy.deepcopy(test_config)
  config.model.connector = "mean"
  config.update(dict(total_steps=1, log_every=1, checkpoint_every=1))
  assert train(config, str(tmp_path))["loss"] > 0
  model = models.build_model(config.model, 128)
  params = validate.abstract_params(config, model)
  by_part = flops.forward_flops(config, params)["by_part"]
  assert by_part["connector"] == 2 * config.global_batch_size * 32 * 32
  assert model.num_image_tokens((1, 32, 32, 3)) == 1
