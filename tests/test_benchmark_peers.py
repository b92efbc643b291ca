"""benchmarks/: Muon and the MAC compositions (issue 15), their grid and report.

Fast smoke tests of the code paths `benchmarks/run.py` uses for them; the
measurements themselves are not rerun here.
"""

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import einsum_decoder
from benchmarks import models
from benchmarks import peers
from benchmarks import report
from benchmarks import run

# The benchmarks use Muon with MuonDimensionNumbers and consistent_rms, which
# the oldest optax the library supports (0.2.5) lacks.
pytestmark = pytest.mark.skipif(
    not hasattr(optax.contrib, 'MuonDimensionNumbers')
    or 'consistent_rms' not in inspect.signature(
        optax.contrib.muon).parameters,
    reason=f'optax {optax.__version__} has no MuonDimensionNumbers / '
    'consistent_rms (the Muon benchmarks need a newer optax)')

def test_muon_dimension_numbers_make_kernels_matrices():
  vit = models.ViT(patch=2, dim=8, depth=1, heads=2)
  params = jax.eval_shape(vit.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 4, 4, 1)))['params']
  dims = peers.muon_dimension_numbers(params)
  attn = dims['Block_0']['MultiHeadDotProductAttention_0']
  dn = optax.contrib.MuonDimensionNumbers
  assert dims['Conv_0']['kernel'] == dn((0, 1, 2), 3)       # [2, 2, 1, 8]
  assert attn['query']['kernel'] == dn(0, (1, 2))           # [8, 2, 4]
  assert attn['out']['kernel'] == dn((0, 1), 2)             # [2, 4, 8]
  assert attn['query']['bias'] is None                      # [2, 4] → Adam
  assert dims['Dense_0']['kernel'] == dn(0, 1)
  assert dims['Dense_0']['bias'] is None


def test_peer_trainers_step():
  model = models.Conv1DNet(channels=(4, 4))
  x, y = models.synthetic_batch('x', (12,), 8, 10)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  for name in peers.NAMES:
    trainer = peers.make_trainer(name, model)
    state = trainer.init(jax.tree_util.tree_map(jnp.copy, params), (x, y))
    for _ in range(2):
      state, loss = trainer.step(state, (x, y), np.float32(1e-3))
    assert np.isfinite(float(loss)), name
    assert jax.tree_util.tree_leaves(trainer.opt_state_of(state))


def _runs(values):
  return [dict(step=[1], time=[0.1], loss=[1.0], acc=[v]) for v in values]


def test_grid_grows_past_a_best_end_point():
  grid = [0.01, 0.03, 0.1]
  up = {'0.01': _runs([0.5]), '0.03': _runs([0.6]), '0.1': _runs([0.7])}
  assert run._extend_grid(grid, up, 'accuracy') == [0.01, 0.03, 0.1, 0.3]
  down = {'0.01': _runs([0.8]), '0.03': _runs([0.6]), '0.1': _runs([0.7])}
  assert run._extend_grid(grid, down, 'accuracy') == [0.00333, 0.01, 0.03,
                                                       0.1]
  inner = {'0.01': _runs([0.5]), '0.03': _runs([0.9]), '0.1': _runs([0.7])}
  assert run._extend_grid(grid, inner, 'accuracy') is None


def test_convergence_and_report_with_peers(tmp_path, monkeypatch):
  data = models.digits(0)

  def tasks(quick):
    del quick
    return {'tiny': dict(data='digits', model=models.MLP((16,)),
                         metric='accuracy', target=0.5, steps=4, batch=16,
                         eval_every=2, desc='MLP 64→16→10 on digits')}, 8
  monkeypatch.setattr(run, 'convergence_tasks', tasks)
  monkeypatch.setattr(run, 'CONVERGE_OPTS', ('sgd', 'muon', 'mac-muon'))
  monkeypatch.setattr(models, 'digits', lambda seed: data)
  out = {}
  run.bench_convergence(True, out)
  opt = out['converge']['tasks']['tiny']['opt']
  assert set(opt) == {'sgd', 'muon', 'mac-muon'}
  for r in opt.values():
    assert 'runs' in r and r['grid'], r
  # Rendered as a tag run's §5b, with the time-to-target table and plot.
  out.update(quick=False, machine_runs={}, speed=dict(models={
      'MLP': dict(opt={o: dict(min=1e-3, median=1e-3) for o in peers.SPEED
                       if o != 'kfac'})}),
             memory=dict(models={'MLP': dict(opt={
                 o: dict(state_bytes=100) for o in peers.SPEED})}))
  with open(tmp_path / 'results_peers.json', 'w') as f:
    json.dump(out, f)
  (tmp_path / 'RESULTS.md').write_text(
      'old\n<!-- x: written by hand -->\nkept\n<!-- /x -->\n')
  report.write({}, str(tmp_path))
  text = (tmp_path / 'RESULTS.md').read_text()
  assert '## 5b. Convergence with Muon and compositions' in text
  assert 'Time to target' in text and '| MAC→Muon |' in text
  assert '## 4c. Step time and memory with Muon' in text
  assert '<!-- x: written by hand -->\nkept\n<!-- /x -->' in text


def test_when_to_use_mac_quotes_results():
  """Every number of docs/when_to_use_mac.md is in benchmarks/RESULTS.md."""
  from tests import test_numbers  # pylint: disable=g-import-not-at-top
  page = (test_numbers.ROOT / 'docs' / 'when_to_use_mac.md').read_text(
      encoding='utf-8')
  results = test_numbers._squash(  # pylint: disable=protected-access
      test_numbers.RESULTS.read_text(encoding='utf-8'))
  numbers = [test_numbers._squash(m.group(0))  # pylint: disable=protected-access
             for m in test_numbers._NUMBER.finditer(  # pylint: disable=protected-access
                 test_numbers._prose(page))]  # pylint: disable=protected-access
  assert len(numbers) > 20
  missing = [n for n in numbers if n not in results]
  assert not missing, f'not stated in benchmarks/RESULTS.md: {missing}'


def test_scaling_with_muon_and_its_report(tmp_path):
  out = {}
  run.bench_scaling(True, out, widths=[16])
  sc = out['scaling']
  for d in (16,):
    for name in ('sgd', 'adamw', 'mac', 'muon'):
      assert 'min' in sc['rows'][d][name], (d, name)
  # Rendered as a tag run's §3b (Muon, AdamW and MAC over SGD-momentum).
  tag_run = dict(quick=False, scaling=sc, machine_runs={'scaling': dict(
      date='today', seconds=1.0, load='0', load_end='0')})
  with open(tmp_path / 'results_peers.json', 'w') as f:
    json.dump(tag_run, f)
  report.write({}, str(tmp_path))
  text = (tmp_path / 'RESULTS.md').read_text()
  assert '## 3b. Scaling with layer width, with AdamW and Muon' in text
  assert '| Muon ms |' in text and '| Muon / SGD |' in text
  assert (tmp_path / 'scaling_peers.png').exists()


def test_einsum_decoder_convergence_task(monkeypatch):
  """The decoder task runs with its plan and its own optimizers, merged."""
  monkeypatch.setattr(run, 'CONVERGE_OPTS', ('kfac', 'mac'))
  monkeypatch.setattr(models, 'mnist1d', lambda seed: 1 / 0)  # not needed
  real = run.convergence_tasks

  def tasks(quick):
    got, ctx = real(quick)
    got['pydoc-einsum-decoder'].update(steps=2, eval_every=2)
    return got, ctx
  monkeypatch.setattr(run, 'convergence_tasks', tasks)
  out = {'converge': dict(tasks={'other': {}})}
  run.bench_convergence(True, out, only_tasks=['pydoc-einsum-decoder'])
  assert set(out['converge']['tasks']) == {'other', 'pydoc-einsum-decoder'}
  opt = out['converge']['tasks']['pydoc-einsum-decoder']['opt']
  assert set(opt) == {'mac'}   # MAC with the plan; kfac not a decoder peer
  for name, r in opt.items():
    assert np.isfinite(r['runs'][str(r['grid'][0])][0]['loss'][-1]), name
  dec = out['converge']['tasks']['pydoc-einsum-decoder']
  assert 'einsum decoder' in dec['desc']
  model = einsum_decoder.config(True)[0]
  dims = peers.muon_dimension_numbers(jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))[
          'params'])
  dn = optax.contrib.MuonDimensionNumbers
  assert dims['layer_0']['attn']['kv_einsum']['kernel'] == dn(0, (2, 3))
  assert dims['layer_0']['mlp']['gating_einsum']['kernel'] == dn(0, 2)
