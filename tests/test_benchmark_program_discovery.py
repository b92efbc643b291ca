"""Smoke test of benchmarks/program_discovery.py: its trainer and its section."""

import jax
import numpy as np

from benchmarks import models
from benchmarks import program_discovery
from benchmarks import run


def test_program_trainer_steps_and_the_section_renders():
  model, kind, shape, classes, batch_size, _ = run.speed_models(True)['MLP']
  batch = models.synthetic_batch(kind, shape, batch_size, classes)
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  trainer = program_discovery.program_trainer(model, params, batch)
  state = trainer.init(params, batch)
  for _ in range(2):
    state, loss = trainer.step(state, batch, np.float32(0.01))
  assert np.isfinite(float(loss))
  timing = dict(min=1.0, median=1.5)
  text = program_discovery.markdown(dict(
      plan=dict(desc='toy', fraction=0.5, layers=2, params=10,
                eval_shape=timing, program_plan=timing, linen_plan=timing),
      plan_repeats=1, repeats=1, inner=1,
      steps={'MLP': dict(compile={k: 1.0 for k in (
          'sgd', 'mac_capture', 'mac_program')}, step={k: timing for k in (
              'sgd', 'mac_capture', 'mac_program')})}))
  assert '| MLP | 1.00 / 1.00 | 1.00 / 1.00 | 1.00 / 1.00 |' in text
