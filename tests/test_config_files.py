"""mm_jax.config.files: configs by name and by spec, and complete() for configs written before a field."""
import ml_collections as mlc

from mm_jax.config import files


def test_every_repository_config_has_every_base_field():
  base = files.get_config("base").to_dict()
  for name, arg in (("shapes_tiny", ""), ("shapes_tiny", "test"), ("siglip_shapes", ""),
                    ("paligemma_3b", ""), ("llava_7b", ""), ("llama32_vision_11b", "")):
    config = files.get_config(name, arg)
    assert files.complete(config).to_dict() == config.to_dict(), name  # nothing to add
    assert set(base) <= set(config), name


def test_a_config_written_before_family_options_and_other_fields_is_completed():
  # The shape of an imported model's OUT/config.py written before model.family_options: flat cross_*
  # and hybrid_tiles fields, and no checkpoint_minutes, mfu_peak_flops or data.bad_records.
  old = files.get_config("shapes_tiny", "test").to_dict()
  del old["model"]["family_options"], old["checkpoint_minutes"], old["mfu_peak_flops"]
  del old["data"]["bad_records"], old["model"]["connector_options"]
  old["model"].update(cross_every=2, cross_num_heads=2, cross_last_image_only=False, hybrid_tiles=3,
                      logit_bias_init=0.0)
  config = files.complete(mlc.ConfigDict(old))
  cross = config.model.family_options.cross
  assert (cross.every, cross.num_heads, cross.num_kv_heads, cross.last_image_only) == (2, 2, 0, False)
  assert config.model.family_options.hybrid.tiles == 3
  assert config.model.family_options.siglip.logit_bias_init == 0.0
  assert "cross_every" not in config.model and "hybrid_tiles" not in config.model
  assert config.checkpoint_minutes == 10.0 and config.mfu_peak_flops == 0.0
  assert config.data.bad_records == "fail"
  assert config.model.connector_options.resampler.num_queries == 64  # the module's default


def test_load_takes_a_spec_relative_to_the_repository():
  assert files.load("configs/shapes_tiny.py:test").total_steps == 4
  assert files.path("configs/base.py").endswith("configs/base.py")
