"""`mac_sgd`: the authors' whole optimizer, step by step."""

import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax


def _problem():
  params = {'layer': {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]]),
                      'bias': jnp.array([0.1, -0.1])},
            'scale': jnp.array([2.0])}
  inter = {'layer': {mac_optax.MEAN: (jnp.array([[1.0, 2.0]]),)}}
  return params, inter


def _mac_direction(grads, damping=1.0):
  """MAC of the layer by hand: Ĝ − a(aᵀĜ)/(λ+aᵀa) with a = [1, 2, 1]."""
  a = np.array([1.0, 2.0, 1.0])
  g = np.concatenate([np.asarray(grads['layer']['kernel']),
                      np.asarray(grads['layer']['bias'])[None]], 0)
  u = g - np.outer(a, a @ g) / (damping + a @ a)
  return u[:2], u[2]


@pytest.mark.parametrize('decoupled', [False, True])
@pytest.mark.parametrize('nesterov', [False, True])
def test_mac_sgd_follows_the_papers_update_rules(decoupled, nesterov):
  params, inter = _problem()
  lr, mu, wd = 0.1, 0.9, 0.01
  tx = mac_optax.mac_sgd(lr, mu, nesterov=nesterov, weight_decay=wd,
                         decoupled_weight_decay=decoupled)
  state = tx.init(params)
  p = {k: np.asarray(v) for k, v in params['layer'].items()}
  p_scale = np.asarray(params['scale'])
  buf = {'kernel': 0.0, 'bias': 0.0, 'scale': 0.0}
  for step in range(3):
    grads = {'layer': {'kernel': jnp.full((2, 2), 0.3 * (step + 1)),
                       'bias': jnp.array([0.2, -0.4])},
             'scale': jnp.array([0.5])}
    current = {'layer': {k: jnp.asarray(v) for k, v in p.items()},
               'scale': jnp.asarray(p_scale)}
    updates, state = tx.update(grads, state, current, intermediates=inter)
    uk, ub = _mac_direction(grads)
    direction = {'kernel': uk, 'bias': ub, 'scale': np.asarray(grads['scale'])}
    values = {'kernel': p['kernel'], 'bias': p['bias'], 'scale': p_scale}
    for name in direction:
      d = direction[name] + (0 if decoupled else wd * values[name])
      buf[name] = mu * buf[name] + d
      step_dir = d + mu * buf[name] if nesterov else buf[name]
      if decoupled:
        step_dir = step_dir + wd * values[name]
      new = values[name] - lr * step_dir
      got = (updates['scale'] if name == 'scale'
             else updates['layer'][name])
      np.testing.assert_allclose(got, new - values[name], rtol=1e-5,
                                 atol=1e-7)
      values[name] = new
    p = {'kernel': values['kernel'], 'bias': values['bias']}
    p_scale = values['scale']


def test_mac_sgd_clips_before_preconditioning_and_masks_decay():
  params, inter = _problem()
  mask = {'layer': {'kernel': True, 'bias': False}, 'scale': False}
  tx = mac_optax.mac_sgd(1.0, 0.0, weight_decay=0.5, weight_decay_mask=mask,
                         clip_norm=1e-3)
  grads = {'layer': {'kernel': jnp.full((2, 2), 10.0),
                     'bias': jnp.array([10.0, 10.0])},
           'scale': jnp.array([10.0])}
  updates, _ = tx.update(grads, tx.init(params), params, intermediates=inter)
  norm = np.sqrt(7 * 100.0)
  clipped = {'layer': {'kernel': grads['layer']['kernel'] * 1e-3 / norm,
                       'bias': grads['layer']['bias'] * 1e-3 / norm}}
  uk, ub = _mac_direction(clipped)
  np.testing.assert_allclose(
      updates['layer']['kernel'], -(uk + 0.5 * params['layer']['kernel']),
      rtol=1e-5)
  np.testing.assert_allclose(updates['layer']['bias'], -ub, rtol=1e-5)
  np.testing.assert_allclose(updates['scale'], -10.0 * 1e-3 / norm,
                             rtol=1e-5)
