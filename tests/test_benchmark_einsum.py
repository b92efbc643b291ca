"""benchmarks/: the einsum decoder's MAC trainer and its RESULTS.md section."""

import jax
import numpy as np

import mac_optax

from benchmarks import einsum_decoder
from benchmarks import models
from benchmarks import steps


def test_mac_trainer_on_the_einsum_decoder_with_and_without_the_plan():
  model, bsz, context, _ = einsum_decoder.config(quick=True)
  batch = models.synthetic_batch('tokens', (context,), 2,
                                 einsum_decoder.VOCAB)
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  # Every projection's kernel is (*inputs, *outputs): its statistic is sown
  # as a Dense's, and a plan-less MAC pairs it too.
  trainer = steps.make_trainer('mac', model)
  copied = jax.tree_util.tree_map(np.array, params)   # the step donates
  _, loss = trainer.step(trainer.init(copied, batch), batch, np.float32(0.1))
  assert np.isfinite(loss)
  plan = einsum_decoder.plan_of(model, context)
  assert mac_optax.EINSUM_MEAN not in {layer.statistic for layer in plan.layers}
  assert plan.fraction > 0.95
  trainer = steps.make_trainer('mac', model, plan=plan)
  before = jax.tree_util.tree_map(np.asarray, params)
  (after, _), loss = trainer.step(trainer.init(params, batch), batch,
                                  np.float32(0.1))
  assert np.isfinite(loss)
  moved = jax.tree_util.tree_map(
      lambda a, b: not np.allclose(a, b), before, after)
  assert all(jax.tree_util.tree_leaves(moved))


def _result(capture_ms):
  timing = lambda ms: dict(min=ms / 1e3, median=ms / 1e3)
  return dict(desc='d', params=1000, fraction=0.99, repeats=3, inner=2,
              jax='x', platform='cpu',
              forward=dict(plain=timing(1.0), capture=timing(capture_ms)),
              step=dict(sgd=timing(2.0), adamw=timing(2.2),
                        mac=timing(2.4)))


def test_section_is_written_in_place(tmp_path):
  path = tmp_path / 'RESULTS.md'
  path.write_text('# head\n\nbefore\n')
  machine = dict(versions={'jax': 'x', 'kfac_jax': 'unavailable (E)'},
                 cpu='c', nproc='2', date='d', load='1 2 3', load_end='4 5')
  einsum_decoder.write_section(str(path), _result(1.5), machine)
  path.write_text(path.read_text() + '\nafter\n')
  einsum_decoder.write_section(str(path), _result(1.25), machine)
  text = path.read_text()
  assert text.count(einsum_decoder.BEGIN) == 1
  assert text.startswith('# head\n\nbefore\n') and text.endswith('after\n')
  # The second run's ratios replaced the first's.
  assert '| with capture | 1.25 / 1.25 | 1.25 / 1.25 |' in text
  assert '1.50' not in text
  assert '| MAC | 2.40 / 2.40 | 1.20 / 1.20 |' in text
  assert 'unavailable' not in text
