#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf modules from proto/ (needs the dev extra:
# grpcio-tools). Usage: scripts/gen-proto.sh [OUTDIR]   (default: orchcore/wire)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-orchcore/wire}"
mkdir -p "$out"
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -Iproto/orch/v1 --python_out="$out" --grpc_python_out="$out" \
    --pyi_out="$out" proto/orch/v1/worker.proto
# protoc writes an absolute import; the modules live inside the orchcore.wire package.
sed -i 's/^import worker_pb2 as worker__pb2$/from . import worker_pb2 as worker__pb2/' \
    "$out/worker_pb2_grpc.py"
