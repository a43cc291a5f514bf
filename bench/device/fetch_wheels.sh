#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a GPU run: downloads into .whl/ (git-ignored) the
# Python 3.12 x86-64 wheels of what fastllava, its tests and its benchmarks need that the lent
# H200 machine's image lacks, or holds at another version (transformers: the tests pin 5.23.0).
# That image (/work/.library/device/KINDS.md) has Python 3.12 with torch, triton, numpy, pillow,
# safetensors, tokenizers, sentencepiece, jinja2, huggingface_hub, httpx, pytest, ... and no
# network. pip resolves each package's dependencies for that target, then only CARRY is kept:
# the rest is on the image already, and the travelling tree is capped at 64 MiB (these: ~27 MB).
# Then: run(command="bash bench/device/run.sh [gpu_suite args]", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY="blake3 fastapi starlette pydantic pydantic_core annotated_types typing_inspection
  typing_extensions uvicorn redis fal_client httpx_sse httpx2 httpcore2 asyncstdlib websockets
  openai jiter sniffio truststore opentelemetry_api jsonschema jsonschema_specifications
  referencing rpds_py trustme cryptography cffi pycparser transformers regex"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  blake3 "fastapi>=0.110" "uvicorn>=0.29" "redis>=5" "fal-client>=0.5" "openai>=1.30" \
  "trustme>=1.1" "jsonschema>=4.18" "transformers==5.23.0"
for whl in .whl/*.whl; do
  name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
  case " $(echo $CARRY) " in *" $name "*) ;; *) rm "$whl" ;; esac
done
ls .whl && du -sh .whl
