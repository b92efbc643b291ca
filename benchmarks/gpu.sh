#!/usr/bin/env bash
# MAC on one GPU in under 8 minutes: the fast tests, step-time ratios in
# float32 and bfloat16, and the statistics' precision against float64.
#
#   benchmarks/gpu.sh                 # on a GPU machine (JAX_PLATFORMS=cuda)
#   benchmarks/gpu.sh --cpu           # the same script on CPU, small sizes
#   benchmarks/gpu.sh --out DIR       # where logs and JSON go
#                                     # (default $TMPDIR/mac_optax_gpu/)
#
# Sections, each under its own time limit so that the whole stays < 8 min:
#   1. tests     the default (not slow) suite on the GPU. The suites that set
#                up their own host devices in subprocesses (test_distributed,
#                test_multiprocess) are CPU by design and are skipped here.
#                Matmuls run at HIGHEST precision: the tests compare with
#                float64 references at float32 tolerance, which TF32 (the
#                GPU default for float32 matmuls) would miss by design; what
#                TF32 does to MAC's statistics is section 3's subject.
#   2. speed     the benchmark models of `benchmarks/run.py --only speed`
#                and GPT-2-small (benchmarks/gpt2_fsdp.py, one device):
#                whole jitted train step, interleaved repeats, min time,
#                AdamW and MAC as ratios to SGD-momentum; float32 and bf16
#                (bf16 parameters and inputs; MAC keeps float32 statistics).
#   3. precision MAC's captured statistics (ā of every layer) of the same
#                models in float32 (default and HIGHEST matmul precision) and
#                bf16, relative to a float64 capture on the same backend.
#   4. cost      benchmarks/compile_cost.py: MAC's compile and step time as
#                ratios to SGD-momentum (statistics from
#                mac_optax.with_statistics), the update's ops per layer, for
#                the benchmark models, a 48-block decoder in nn.scan and
#                GPT-2-small (--cpu: --quick, an 8-block decoder unrolled and
#                in nn.scan).
#
# Results: $OUT/{device,tests,speed,precision,cost}.log, speed.json,
# precision.json and cost.json, and a Markdown summary on stdout with the device name and
# versions, ready for benchmarks/RESULTS.md. Exit status: non-zero if any
# section failed or ran out of time (the others still run).
#
# So far run with --cpu only (2 CPU cores: about 5 minutes); not yet on a GPU.

set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
OUT="${TMPDIR:-/tmp}/mac_optax_gpu"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,/^$/p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

if [ "$MODE" = cpu ]; then
  # A dry run of every section: a few test files, the quick model shapes.
  export JAX_PLATFORMS=cpu
  TESTS=(tests/test_rank_one.py tests/test_precision.py)
  SIZE=--quick
  COST=(--quick)
  LIMIT_TESTS=240 LIMIT_SPEED=240 LIMIT_PRECISION=120 LIMIT_COST=240
else
  # Fail rather than fall back to the CPU silently.
  export JAX_PLATFORMS=cuda
  TESTS=(tests --ignore=tests/test_distributed.py
         --ignore=tests/test_multiprocess.py)
  SIZE=
  # The ratios of benchmarks/RESULTS.md's compile-cost table, GPT-2-small
  # and the 48-block decoder in nn.scan included (unrolled: CPU only).
  COST=(--only MLP ResNet ViT GPT "Decoder-48 scan" GPT-2-small)
  LIMIT_TESTS=170 LIMIT_SPEED=200 LIMIT_PRECISION=40 LIMIT_COST=150
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=()

section() {  # section NAME LIMIT_S COMMAND...: runs it into $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s) ==="
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start)) s ==="
  if [ $rc -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
}

section device 20 "$PY" -c '
import platform, jax, jaxlib, flax, optax
d = jax.devices()[0]
print(f"device: {d.platform} {d.device_kind} x{jax.device_count()}; "
      f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"flax {flax.__version__}, optax {optax.__version__}, "
      f"python {platform.python_version()}")
'

# -n 0: one test process for the one GPU (pyproject's default is one per core).
JAX_DEFAULT_MATMUL_PRECISION=highest section tests "$LIMIT_TESTS" \
  "$PY" -m pytest -q -m 'not slow' -n 0 -p no:cacheprovider "${TESTS[@]}"

TQDM_DISABLE=1 section speed "$LIMIT_SPEED" "$PY" - $SIZE --out "$OUT/speed.json" <<'EOF'
"""Step-time ratios to SGD-momentum, float32 and bf16 (min of repeats)."""
import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import gpt2_fsdp
from benchmarks import models
from benchmarks import run as bench
from benchmarks import steps

parser = argparse.ArgumentParser()
parser.add_argument('--quick', action='store_true')
parser.add_argument('--out')
args = parser.parse_args()
# The timing helpers of benchmarks/run.py; kfac-jax is not part of this run.
repeats, inner = (3, 3) if args.quick else (10, 5)
names = ('sgd', 'adamw', 'mac')
configs = dict(bench.speed_models(args.quick))
# GPT-2-small (124 M) on this one device, batch 8 x 256 (--cpu: its small
# stand-in).
gpt2, batch_size, _, gpt2_desc = gpt2_fsdp.config(args.quick)
configs['GPT-2-small'] = (gpt2, 'tokens', (gpt2.context,), gpt2.vocab,
                          batch_size, gpt2_desc)
device = jax.devices()[0]
# Rows are printed and saved as they come: a run cut short by the section's
# time limit keeps what it measured.
print(f'\n#### Step time, {device.platform} {device.device_kind} '
      f'(min of {repeats} interleaved repeats x {inner} steps)\n')
print('| model | dtype | SGD-momentum ms/step | AdamW / SGD | MAC / SGD '
      '| MAC / SGD compile |')
print('|---|---|---:|---:|---:|---:|', flush=True)
rows = []
for dtype in (jnp.float32, jnp.bfloat16):
  for mname, (model, kind, shape, classes, bsz, desc) in configs.items():
    x, y = models.synthetic_batch(kind, shape, bsz, classes)
    params = model.init(jax.random.PRNGKey(0), x)['params']
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    if jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(dtype)
    batch = (x, y)
    runners, compile_s = {}, {}
    for name in names:
      trainer = steps.make_trainer(name, model)
      state, compiled, compile_s[name] = bench._compile(  # pylint: disable=protected-access
          trainer, params, batch)
      # Distinct buffers: an eagerly built state may share one zeros array
      # between leaves, which the donating step cannot take twice.
      state = bench._fresh(state)  # pylint: disable=protected-access
      run, _ = bench._timed_runner(compiled, state, batch, inner)  # pylint: disable=protected-access
      run()  # warm-up
      runners[name] = run
    times = bench._interleaved(  # pylint: disable=protected-access
        runners, repeats, inner, f'{mname} {jnp.dtype(dtype).name}')
    sgd = times['sgd']['min']
    r = dict(model=mname, desc=desc, dtype=jnp.dtype(dtype).name,
             sgd_ms=1e3 * sgd,
             adamw_ratio=times['adamw']['min'] / sgd,
             mac_ratio=times['mac']['min'] / sgd,
             mac_compile_ratio=compile_s['mac'] / compile_s['sgd'])
    rows.append(r)
    print(f"| {r['model']} | {r['dtype']} | {r['sgd_ms']:.3f} | "
          f"{r['adamw_ratio']:.2f} | {r['mac_ratio']:.2f} | "
          f"{r['mac_compile_ratio']:.2f} |", flush=True)
    with open(args.out, 'w') as f:
      json.dump(dict(device=f'{device.platform} {device.device_kind}',
                     jax=jax.__version__, repeats=repeats, inner=inner,
                     rows=rows), f, indent=1)
EOF

section precision "$LIMIT_PRECISION" "$PY" - $SIZE --out "$OUT/precision.json" <<'EOF'
"""MAC's statistics in float32 / bf16 against a float64 capture."""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import mac_optax
from benchmarks import models
from benchmarks import run as bench
from tests.reference import x64

parser = argparse.ArgumentParser()
parser.add_argument('--quick', action='store_true')
parser.add_argument('--out')
args = parser.parse_args()


def statistics(model, params, x):
  with mac_optax.linen.capture():
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  return v['intermediates']


def capture(model, params, x, dtype):
  cast = lambda a: (a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                    else a)
  params = jax.tree_util.tree_map(cast, params)
  out = jax.jit(statistics, static_argnums=0)(model, params, cast(x))
  return [np.asarray(l, np.float64) for l in jax.tree_util.tree_leaves(out)]


def errors(got, want):
  """max |got − want| / max |want| per statistic (one per layer)."""
  return [float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
          for g, w in zip(got, want)]


rows = []
for mname, (model, kind, shape, classes, bsz, _) in bench.speed_models(
    args.quick).items():
  x, _ = models.synthetic_batch(kind, shape, bsz, classes)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  host = jax.tree_util.tree_map(np.asarray, (params, x))
  with x64():
    want = capture(model, *jax.tree_util.tree_map(jnp.asarray, host),
                   jnp.float64)
  variants = {'float32': (jnp.float32, 'default'),
              'float32 HIGHEST': (jnp.float32, 'highest'),
              'bfloat16': (jnp.bfloat16, 'default')}
  for label, (dtype, precision) in variants.items():
    with jax.default_matmul_precision(precision):
      got = capture(model, params, x, dtype)
    err = errors(got, want)
    rows.append(dict(model=mname, variant=label, layers=len(err),
                     max_rel=max(err), median_rel=float(np.median(err))))
device = jax.devices()[0]
print(f'\n#### Statistics vs float64, {device.platform} '
      f'{device.device_kind} (max |error| / max |ā|, per layer)\n')
print('| model | statistics | layers | max over layers | median |')
print('|---|---|---:|---:|---:|')
for r in rows:
  print(f"| {r['model']} | {r['variant']} | {r['layers']} | "
        f"{r['max_rel']:.1e} | {r['median_rel']:.1e} |")
with open(args.out, 'w') as f:
  json.dump(dict(device=f'{device.platform} {device.device_kind}',
                 jax=jax.__version__, rows=rows), f, indent=1)
EOF

TQDM_DISABLE=1 section cost "$LIMIT_COST" "$PY" benchmarks/compile_cost.py \
  "${COST[@]}" --no-write --compile-repeats 2 --repeats 3 --inner 2 \
  --json "$OUT/cost.json"

echo
echo "## MAC on $(grep -h '^device:' "$OUT/device.log" | cut -c9-)"
echo
echo "tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
for name in speed precision cost; do
  echo
  grep -E '^(####|\|)' "$OUT/$name.log" || true
done
echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all sections passed"
