#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels the GPU machine lacks or holds in another version than diffalign needs
# (it has torch 2.11 + CUDA 13, accelerate, transformers and peft, no diffusers, open_clip or datasets, and no package
# index): this venv's versions of diffalign's dependencies (and DeepSpeed, for the ZeRO-2 item), for that machine's
# Python 3.12 on x86-64, without their own dependencies (the rest is there).
# Then: device run `bash scripts/gpu_check.sh --out $OUT`, carry [.whl].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES="diffusers transformers tokenizers huggingface_hub peft accelerate safetensors open_clip_torch timm ftfy
wcwidth datasets dill multiprocess typer rich httpx2 importlib_metadata pydantic pydantic_core annotated_types
typing_inspection httpcore2 truststore lazy_importer typing_extensions idna"
pins=()
for name in $PACKAGES; do
  pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir .whl
platforms=()
for n in 39 35 34 31 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}" hjson==3.1.0
# DeepSpeed (for the ZeRO-2 item) is published as source only: built here into a pure wheel, its ops left to JIT
sdist=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: deepspeed==0.19.8 -d "$sdist"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "$sdist"/deepspeed-*.tar.gz -w .whl
rm -rf "$sdist"
du -sh .whl
