#!/usr/bin/env bash
# Create .venv and install the project with the pins in constraints.txt. Idempotent: a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
pip install -q -c constraints.txt -e ".[offline,dev]"
# facenet-pytorch pins an old torch: install it without its dependencies (we only use its MTCNN weights).
pip install -q --no-deps "facenet-pytorch>=2.5"
# ultralytics depends on opencv-python, which installs OpenCV 5 (no Haar cascades, no HOG people detector)
# over the headless 4.x build. Keep exactly one cv2: the headless 4.x one.
if pip show -q opencv-python >/dev/null 2>&1; then
  pip uninstall -q -y opencv-python
  pip install -q --force-reinstall --no-deps -c constraints.txt "opencv-python-headless<5"
fi
# The gallery test opens pages in headless Chromium. Best effort (~35 s), only as root with apt: without it that
# test is skipped with its reason, nothing else depends on it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }) \
    || echo "setup: could not install chromium (the gallery browser test will be skipped)" >&2
fi
python - <<'PY'
import cv2, torch, prefect, transformers, diffusers
assert hasattr(cv2, "HOGDescriptor"), "opencv-python-headless<5 expected"
print(f"env ok: torch {torch.__version__}, prefect {prefect.__version__}, transformers {transformers.__version__}, "
      f"diffusers {diffusers.__version__}, opencv {cv2.__version__}")
PY
