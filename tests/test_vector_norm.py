"""The one-pass overflow-safe norm against float64 sums, and its finite check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mac_optax._src import vector_norm


def _reference(x: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
  """(max(‖x‖∞, 1), ‖x‖² / that²) in float64, by explicit sums."""
  x = np.asarray(x, np.float64)
  scale = np.maximum(np.max(np.abs(x), axis=axes), 1.0)
  shape = [1 if a in axes else n for a, n in enumerate(x.shape)]
  return scale, np.sum(np.square(x / scale.reshape(shape)), axis=axes)


@pytest.mark.parametrize('magnitude', [1e-3, 1.0, 30.0, 1e19, 1e30])
@pytest.mark.parametrize('axes', [(-1,), (1, 2)])
def test_norm_equals_the_float64_sum_of_squares_at_any_magnitude(
    magnitude, axes):
  # Entries spread over six orders of magnitude: the largest sets the scale,
  # the smallest must still count. From 1e19 on ‖x‖² overflows float32.
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(2, 3, 257)) * magnitude
       * 10.0 ** rng.integers(-6, 1, size=(2, 3, 257)))
  x32 = np.asarray(x, np.float32)
  got = jax.jit(lambda v: vector_norm.norm(v, axes))(jnp.asarray(x32))
  scale, sum_sq = _reference(x32, tuple(a % 3 for a in axes))
  np.testing.assert_allclose(got.scale, scale, rtol=1e-7)
  np.testing.assert_allclose(got.sum_sq, sum_sq, rtol=2e-6)
  assert np.all(np.isfinite(got.sum_sq))


def test_zero_vector_has_scale_one_and_no_norm():
  got = vector_norm.norm(jnp.zeros((3, 8)))
  np.testing.assert_array_equal(got.scale, np.ones(3))
  np.testing.assert_array_equal(got.sum_sq, np.zeros(3))


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('where', [0, 100, 255])
def test_all_finite_finds_one_non_finite_entry_anywhere(bad, where):
  x = np.full((2, 256), 3e38, np.float32)   # finite, near float32's max
  x[1, where] = bad
  finite = jax.jit(vector_norm.all_finite)(jnp.asarray(x))
  np.testing.assert_array_equal(finite, [True, False])


def test_norm_is_one_kernel_on_cpu():
  # What the module is for: XLA:CPU splits a plain reduction of this length
  # into a chain of reduce-window kernels, and keeps `abs`/`square` apart.
  x = jax.ShapeDtypeStruct((1, 3072), jnp.float32)
  text = jax.jit(vector_norm.norm).lower(x).compile().as_text()
  entry = text[text.index('ENTRY'):]
  assert 'reduce-window' not in entry, entry
  assert len([line for line in entry.splitlines()
              if ' fusion(' in line or ' reduce(' in line]) == 1, entry
