#!/usr/bin/env bash
# The copy path's GPU checks in one command, from the repository root of a CUDA machine (no installs, no
# network): build/JIT the extension, run the copy-path tests (CPU and GPU), then the bandwidth benchmark.
# Everything is logged under $OUT; the exit status is non-zero if the build or any test failed.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0

{ nvidia-smi; nvcc --version; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  > "$OUT/env.txt" 2>&1

echo "== build (JIT into ~/.cache/kvoffload)"
python - <<'PY' 2>&1 | tee "$OUT/build.log"
import time
start = time.perf_counter()
from kvoffload.transfer.cuda import extension
module = extension()
print(f"extension {module.__name__} from {module.__file__} ready in {time.perf_counter() - start:.1f} s")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== tests"
python -m pytest tests/test_copy_path.py tests/test_csrc_build.py -q -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark"
python benchmarks/copy_bandwidth.py --json "$OUT/copy_bandwidth.json" 2>&1 | tee "$OUT/copy_bandwidth.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== exit status $status (logs in $OUT)"
exit $status
