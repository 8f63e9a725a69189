#!/usr/bin/env bash
# Create benchmarks/.venv-quix: Quix Streams 3.28.1 in a virtual environment of its own.
#
# Why a separate venv: quixstreams 3.28.1 requires confluent-kafka < 2.13 while Sluice
# pins 2.16.1, so the two cannot share one environment. Everything is pinned so the
# comparison is repeatable; fastavro is the same version Sluice uses, so Avro cost is equal.
# Idempotent: an existing venv with the right quixstreams is left as it is.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-quix"
PYTHON="${PYTHON:-python3.11}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
    'import importlib.metadata as m, sys; sys.exit(m.version("quixstreams") != "3.28.1")' \
    2>/dev/null; then
  echo "quix venv ready: $VENV"
  exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  "quixstreams[avro]==3.28.1" \
  "confluent-kafka[avro,json,protobuf,schemaregistry]==2.12.2" \
  "fastavro==1.13.1" \
  "orjson==3.13.0"
"$VENV/bin/python" -c 'import quixstreams, confluent_kafka; print("quixstreams",
  quixstreams.__version__, "confluent-kafka", confluent_kafka.version()[0])'
echo "quix venv ready: $VENV"
