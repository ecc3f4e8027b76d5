r"""Stage recipes of the reference systems (DESIGN.md §2) on `shapes`, each run end to end by one
command:

  python -m mm_jax.recipe --config=configs/recipes.py:llava --workdir=workdirs/recipes/llava \
      --pretrain_dir=workdirs/recipes/pretrain
  python -m mm_jax.recipe --config=configs/recipes.py:llava,test --workdir=/tmp/llava   # seconds

A recipe is an ordered list of stages; each stage is one `python -m mm_jax.train` run (its base config +
`overrides`, a flat dict of dotted config keys) that starts from earlier stages' checkpoints by name
(`init`: ordered (stage, source prefix, destination prefix), turned into config.init.parts) with params
only, and its own warmup + cosine schedule. lr and the rest stay at the base config's values.

Every recipe begins with the same two pretraining stages (`pretrain` True; same names and settings in
every recipe, so one --pretrain_dir serves them all and is trained once):
  siglip    configs/siglip_shapes.py as is: the encoder, by the SigLIP loss on (image, caption) pairs
  text_lm   configs/shapes_tiny.py, family "lm", 1000 steps: the decoder alone, next-token prediction on
            the dataset's text (the image is ignored)
Then 3000 multimodal steps in total per recipe, the unified default's budget (steps: trainable parts,
the rest frozen; encoder/ from siglip and decoder/ from text_lm, later stages from the stage before):
  llava           mlp connector.  connector 1000 (connector) -> connector_llm 2000 (connector, decoder)
  llama32_vision  cross family.   encoder_cross 3000 (encoder, connector, cross; the LLM frozen). Its
                  stage 2 (same parts at a higher resolution) is left out: shapes has one resolution.
  molmo           mlp connector.  all 3000 (everything)
  baichuan_omni   mlp connector (its projector is an MLP).  connector 1000 -> connector_encoder 1000
                  (+ encoder) -> all 1000
  qwen2_vl        pixel_shuffle connector (Qwen2-VL's 2x2 patch merger).  encoder 1000 (encoder and
                  the new connector; the LLM frozen) -> all 1000 -> llm 1000 (decoder; encoder and
                  connector frozen)
  nvlm_x          cross family.   cross 1500 (connector, cross) -> cross_sft 1500 (same)
The cross recipes keep shapes_tiny's linear connector (cross family from scratch at 3000 steps: linear
0.690, mlp 0.681, resampler 0.593 test EM; experiments/README.md).

What to expect (experiments/README.md, "Families, connectors and stage recipes"), test
vqa_exact_match at the end: llava 0.915, llama32_vision 0.731, molmo 0.943, baichuan_omni 0.615,
qwen2_vl 0.852, nvlm_x 0.754. On a 2-core CPU: the pretraining once (siglip 4 min, text_lm 1.5 min),
then 6-10 min per recipe (llama32_vision: 10 min; frozen parts make steps faster). WORKDIR/recipe.json
gets each stage's checks and test score.

Variant `test` (`NAME,test`): every base config's :test variant (tiny model and dataset) and 3 steps
per multimodal stage (siglip as its :test is), one checkpoint per stage, so a whole recipe runs in
seconds (tests/test_recipe.py).

Top-level fields apply to every stage: data_dir (copied into data.data_dir; "" keeps each config's),
checkpoint_every and keep_checkpoints (0 keeps each config's), e.g. --config.checkpoint_every=250.
"""
import ml_collections as mlc

TINY, SIGLIP = "configs/shapes_tiny.py", "configs/siglip_shapes.py"
TEST_STEPS = 3  # per multimodal stage at the test variant: step 1 has lr 0 (warmup), later ones train
PRETRAINED = (("siglip", "encoder/", "encoder/"), ("text_lm", "decoder/", "decoder/"))
ALL = ((".*", "trainable"),)
# Stages that fine-tune the pretrained encoder do so at a tenth of the learning rate (the real recipes
# train it gently too): at the decoder's rate it loses its SigLIP features (experiments/README.md:
# Molmo 0.62 -> 0.94 test EM).
GENTLE_ENCODER = dict(optim__lr_scales=(("encoder/.*", 0.1),))


def train(*parts: str) -> tuple:
  """Freeze rules: the named top-level subtrees trainable, every other param frozen."""
  return tuple((f"{p}/.*", "trainable") for p in parts) + ((".*", "frozen"),)


def after(stage: str) -> tuple:
  """init from every param of an earlier stage (same architecture)."""
  return ((stage, "", ""),)


def stage(name: str, steps: int, rules: tuple, init: tuple, **overrides) -> dict:
  """A multimodal stage on shapes_tiny; `overrides` by dotted key as keyword args with '__' for '.'."""
  flat = {k.replace("__", "."): v for k, v in overrides.items()}
  return dict(name=name, config=TINY, pretrain=False, init=init,
              overrides={**flat, "total_steps": steps, "optim.rules": rules})


# Shared by every recipe: same names and settings, so one pretraining dir serves all.
PRETRAIN = (
    dict(name="siglip", config=SIGLIP, pretrain=True, init=(), overrides={}),
    dict(name="text_lm", config=TINY, pretrain=True, init=(),
         overrides={"model.family": "lm", "total_steps": 1000}),
)


def _llava():
  """LLaVA: the connector alone, then connector + LLM (encoder frozen throughout)."""
  mlp = dict(model__connector="mlp")
  return (stage("connector", 1000, train("connector"), PRETRAINED, **mlp),
          stage("connector_llm", 2000, train("connector", "decoder"), after("connector"), **mlp))


def _llama32_vision():
  """Llama 3.2 Vision (Method B): encoder + adapter + cross-attention, the LLM frozen."""
  return (stage("encoder_cross", 3000, train("encoder", "connector", "cross"), PRETRAINED,
                model__family="cross", **GENTLE_ENCODER),)


def _molmo():
  """Molmo: everything at once from the pretrained encoder and LLM."""
  return (stage("all", 3000, ALL, PRETRAINED, model__connector="mlp", **GENTLE_ENCODER),)


def _baichuan_omni():
  """Baichuan-Omni: connector, then + encoder, then everything."""
  mlp = dict(model__connector="mlp")
  return (stage("connector", 1000, train("connector"), PRETRAINED, **mlp),
          stage("connector_encoder", 1000, train("connector", "encoder"), after("connector"), **mlp,
                **GENTLE_ENCODER),
          stage("all", 1000, ALL, after("connector_encoder"), **mlp, **GENTLE_ENCODER))


def _qwen2_vl():
  """Qwen2-VL: encoder (+ its new 2x2 merger), then everything, then the LLM alone."""
  ps = dict(model__connector="pixel_shuffle")
  return (stage("encoder", 1000, train("encoder", "connector"), PRETRAINED, **ps, **GENTLE_ENCODER),
          stage("all", 1000, ALL, after("encoder"), **ps, **GENTLE_ENCODER),
          stage("llm", 1000, train("decoder"), after("all"), **ps))


def _nvlm_x():
  """NVLM-X: cross-attention (+ connector) only, the LLM and encoder frozen, twice (pretrain, SFT)."""
  cross = dict(model__family="cross")
  return (stage("cross", 1500, train("connector", "cross"), PRETRAINED, **cross),
          stage("cross_sft", 1500, train("connector", "cross"), after("cross"), **cross))


# name -> stages after the shared pretraining; `python -m mm_jax.recipe --help` lists them.
RECIPES = {"llava": _llava, "llama32_vision": _llama32_vision, "molmo": _molmo,
           "baichuan_omni": _baichuan_omni, "qwen2_vl": _qwen2_vl, "nvlm_x": _nvlm_x}


def get_config(arg: str = "") -> mlc.ConfigDict:
  name, *variants = arg.split(",")
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} "
                     "(--config=configs/recipes.py:NAME[,test])")
  if set(variants) - {"test"}:
    raise ValueError(f"unknown variant {sorted(set(variants) - {'test'})[0]!r} of recipes; known: test")
  test = "test" in variants
  c = mlc.ConfigDict()
  c.name = name
  c.data_dir = ""           # copied into every stage's data.data_dir; "": each config's own
  c.checkpoint_every = 0    # every stage's; 0: each config's own
  c.keep_checkpoints = 0    # every stage's; 0: each config's own
  if test:
    c.checkpoint_every = 100  # one checkpoint per stage, at its end
  stages = []
  for s in PRETRAIN + RECIPES[name]():
    overrides = dict(s["overrides"])
    if test and "total_steps" in overrides:
      overrides["total_steps"] = TEST_STEPS
    # Dotted keys: a ConfigDict that allows them, so the dict stays flat (update_from_flattened_dict).
    stages.append(mlc.ConfigDict(dict(
        name=s["name"], config=s["config"] + (":test" if test else ""), pretrain=s["pretrain"],
        init=s["init"], overrides=mlc.ConfigDict(overrides, allow_dotted_keys=True))))
  c.stages = tuple(stages)
  return c
