# Rebuild .whl here (py3.12 pip; promise ships only an sdist, so it is built): P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"; python3.12 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl grain==0.2.18 array_record==0.8.6 ml-collections==1.1.0 tensorflow-datasets==4.9.10 importlib_resources==7.1.0 tensorboardX==2.6.5 dm-tree==0.1.10 simple-parsing==0.1.9 docstring-parser==0.18.0 immutabledict==4.3.1 toml==0.10.2 termcolor==3.3.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 portpicker==1.6.0 etils==1.15.0 protobuf==7.36.2 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92 tensorstore==0.1.86 && python3.12 -m pip wheel --no-deps -w .whl promise==2.3
#
# Python environment for mm_jax on the lent GPU machine (device tool; python3 3.12 with jax 0.11.2 and its
# CUDA plugin already installed there, nothing downloadable). From the repo root, there:
#
#   source experiments/gpu_env.sh && python3 -m mm_jax.train --config=configs/shapes_tiny.py ...
#
# with `.whl` (the wheels above, ~34 MiB; ignored through .git/info/exclude: `/.whl/`) in the run's carry.
# The wheels go to /tmp/site, first on PYTHONPATH: the packages the machine lacks (grain, array_record,
# ml-collections, tfds and their needs), plus our pinned flax/optax/orbax-checkpoint/chex/etils/
# tensorstore/protobuf so that the machine's own versions of those do not decide the run. jax/jaxlib are the
# machine's (0.11.2 + CUDA), never carried. Seen there (H100, 2026-11-22): flax 0.12.10, orbax-checkpoint 0.12.4,
# tensorstore 0.1.85, etils 1.14.0, optax 0.2.8, chex 0.1.92, protobuf 7.36.2, numpy 2.5.2, sentencepiece 0.2.2.
# Verified: shapes_tiny 300 steps at ~50 steps/s on one H100, then mm_jax.eval.

if [ ! -d .whl ] || ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu_env.sh: no wheels in $PWD/.whl (carry .whl; recipe at the top of this file)" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_env.sh: pip install into /tmp/site failed" >&2; return 1 2>/dev/null || exit 1; }

export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # allocate on demand: several runs can share the GPU
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

python3 - <<'EOF'
import importlib.metadata as md, jax
print("jax", jax.__version__, jax.devices(),
      " ".join(f"{p}={md.version(p)}" for p in ("flax", "optax", "orbax-checkpoint", "grain", "numpy")))
EOF
