#!/usr/bin/env bash
# The GPU path, measured in one go: the gpu-marked tests, then bench/gpu.py (PyTorch fp16
# channels_last, ONNX Runtime CUDA/TensorRT where installed, the full pipeline through a
# `-Q gpu` worker). Every output goes to OUT_DIR; summary.txt collects the figures.
#
#   bench/gpu_bench.sh OUT_DIR [bench/gpu.py options, e.g. --n 500]
#
# Without CUDA it still runs: the gpu tests are skipped and so are the GPU figures.
set -uo pipefail
out=${1:?usage: bench/gpu_bench.sh OUT_DIR [bench/gpu.py options]}
shift
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
{ nvidia-smi || echo "nvidia-smi: not available"; } > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import onnxruntime as o, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); print('onnxruntime', o.__version__, o.get_available_providers())" \
  > "$out/versions.txt" 2>&1
cat "$out/versions.txt" >> "$summary"
"$py" -m pytest -m gpu -p no:cacheprovider -q -rs > "$out/gpu-tests.txt" 2>&1
echo "gpu tests (exit $?): $(tail -n 1 "$out/gpu-tests.txt")" >> "$summary"
"$py" bench/gpu.py "$@" > "$out/gpu-bench.txt" 2>&1
status=$?
cat "$out/gpu-bench.txt" >> "$summary"
cat "$summary"
exit $status
