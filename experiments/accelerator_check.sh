#!/usr/bin/env bash
# The accelerator check: one command, at most ~8 minutes on one GPU, from the repository root.
#
#   bash experiments/accelerator_check.sh [--data DIR] [--out DIR] [--budget-s S] [--cpu-dry-run]
#
# For a machine with jax (CUDA) preinstalled and no internet (jax 0.11.x, Python 3.12). It
#   1. runs the test suite on the accelerator (tests marked as needing a CPU are skipped with
#      their reasons; integration tests are left out to stay within the time);
#   2. benchmarks the cnn and a ResNet-18 at CIFAR-10 shape (synthetic data): P-policy
#      evaluation vs its limit (P = 1..256), traced vs static bits, certify vs exhaustive,
#      stage-B steps/s, memory against P (experiments/accelerator_check.py);
#   3. in the time left, a shortened ResNet-18 Fashion-MNIST pipeline (teacher, student, both
#      pairs, stage C);
#   4. writes OUT/report.md and OUT/report.json: device name, absolute throughput, ratios and
#      the tuning-table entries the measurements suggest.
#
# Preparation, on a machine with the project's venv and pip (the accelerator has neither
# internet nor ml-collections), once:
#
#   bash experiments/accelerator_check.sh --prepare
#
# copies Fashion-MNIST's IDX files (from $PTQ_ADVERSARY_FASHION_MNIST_DIR or Debian's
# /usr/share/datasets/fashion-mnist) to .accel/fashion-mnist and downloads the wheels the
# accelerator lacks (ml-collections) for Python 3.12 to .accel/wheels; .accel/ is ignored by
# git, so carry it to the accelerator with the checkout. --data DIR uses another copy.
#
# --cpu-dry-run: the same phases on the CPU at tiny sizes, on the cnn alone (a ResNet compile
# costs a minute on 2 cores); tests/test_experiments.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=accelerator_check
DATA=""
BUDGET_S=480
DRY=0
PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --data) DATA="$2"; shift 2 ;;
    --data=*) DATA="${1#*=}"; shift ;;
    --budget-s) BUDGET_S="$2"; shift 2 ;;
    --budget-s=*) BUDGET_S="${1#*=}"; shift ;;
    --cpu-dry-run) DRY=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

if [ "$PREPARE" = 1 ]; then
  src=${PTQ_ADVERSARY_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
  ls "$src"/*-ubyte* >/dev/null 2>&1 || { echo "error: no Fashion-MNIST IDX files in $src" >&2; exit 2; }
  mkdir -p .accel/fashion-mnist .accel/wheels
  cp "$src"/*-ubyte* .accel/fashion-mnist/
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any \
    -d .accel/wheels ml-collections==1.1.0 || exit 2
  echo "prepared .accel/ ($(du -sh .accel | cut -f1)); carry it with the checkout"
  exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
PHASES="$OUT/phases.json"
echo "{}" > "$PHASES"
phase() {  # phase NAME STATUS SECONDS
  $PY - "$PHASES" "$1" "$2" "$3" <<'EOF'
import json, sys
path, name, status, seconds = sys.argv[1:]
d = json.load(open(path))
d[name] = {"status": status, "seconds": float(seconds)}
json.dump(d, open(path, "w"), indent=1)
EOF
}

# Packages the accelerator image lacks travel as wheels (--prepare).
if ! $PY -c "import ml_collections" 2>/dev/null; then
  if ls .accel/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/ptq_site .accel/wheels/*.whl || exit 2
    export PYTHONPATH=/tmp/ptq_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "error: ml_collections is not importable; run --prepare where pip works and carry .accel/" >&2
    exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "$DATA" ] && [ -d .accel/fashion-mnist ]; then DATA=.accel/fashion-mnist; fi
if [ -n "$DATA" ]; then export PTQ_ADVERSARY_FASHION_MNIST_DIR=$(cd "$DATA" && pwd); fi
export TQDM_DISABLE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  TEST_S=120; BENCH_S=900; DRYFLAG=--dry-run  # limits only against a hang: all must run
  TESTS=(tests/test_quant.py)
else
  TEST_S=150; BENCH_S=200; DRYFLAG=""
  TESTS=(tests -m "not integration" -n 4)
fi
$PY -c "import jax; print('backend', jax.default_backend(), jax.devices())" || exit 2

# 1. the test suite on this backend
t0=$(date +%s)
# SIGINT at the limit: pytest stops and still writes the results of the tests it ran.
timeout -s INT -k 30 "$TEST_S" $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$OUT/junit.xml" \
  > "$OUT/tests.log" 2>&1
rc=$?
$PY - "$OUT" "$rc" <<'EOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET
out, rc = pathlib.Path(sys.argv[1]), int(sys.argv[2])
counts, failed, skipped = {"passed": 0, "failed": 0, "skipped": 0}, [], []
if (out / "junit.xml").exists():
    for case in ET.parse(out / "junit.xml").getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1; failed.append(name)
        elif (s := case.find("skipped")) is not None:
            counts["skipped"] += 1; skipped.append(f"{name}: {s.get('message', '')[:200]}")
        else:
            counts["passed"] += 1
status = {0: "passed", 124: "timed out", 2: "interrupted at the time limit"}.get(rc, f"exit {rc}")
json.dump({"status": status, "counts": counts, "failed": failed, "skipped": skipped},
          open(out / "tests.json", "w"), indent=1)
print("tests:", status, counts)
EOF
phase tests "$([ $rc = 0 ] && echo passed || echo "exit $rc")" $(( $(date +%s) - t0 ))

# 2. benchmarks
t0=$(date +%s)
timeout $(( BENCH_S + 60 )) $PY experiments/accelerator_check.py bench --out "$OUT" $DRYFLAG \
  --budget-s "$BENCH_S"
rc=$?
phase bench "$([ $rc = 0 ] && echo done || echo "exit $rc")" $(( $(date +%s) - t0 ))

# 3. a shortened ResNet-18 pair run in the time left (less 30 s for the report)
t0=$(date +%s)
rest=$(( $(left) - 30 ))
if [ "$DRY" = 1 ]; then
  CFG="configs/fmnist_pair.py:smoke,mode=detrimental"  # the cnn student: no ResNet compile
  OVR=(--config.teacher.optim.num_steps=2 --config.student.optim.num_steps=2
       --config.pairs.optim.num_steps=2 --config.data.test_limit=64 --config.data.val_size=64
       --config.eval.uniform_bits="(8,)")
  rest=$(( rest > 300 ? rest : 300 ))
else
  CFG="configs/fmnist_resnet20.py"
  OVR=(--config.student.model.name=resnet18 --config.teacher.optim.num_steps=400
       --config.student.optim.num_steps=400 --config.pairs.optim.num_steps=200
       --config.pairs.eval_every_steps=100 --config.eval.batch_size=1000)
fi
if [ "$rest" -gt 30 ]; then
  timeout "$rest" $PY -m ptq_adversary.main --config="$CFG" "${OVR[@]}" \
    --config.log.progress=False --config.log.tensorboard=False --workdir="$OUT/pair" \
    > "$OUT/pair.log" 2>&1
  rc=$?
  phase pair "$([ $rc = 0 ] && echo done || { [ $rc = 124 ] && echo "timed out" || echo "exit $rc"; })" \
    $(( $(date +%s) - t0 ))
else
  phase pair "skipped: no time left" 0
fi

# 4. the report
$PY experiments/accelerator_check.py report --out "$OUT" $DRYFLAG
echo "accelerator check: $(( $(date +%s) - START )) s; report in $OUT/report.md"
