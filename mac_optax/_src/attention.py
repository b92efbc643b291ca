"""Attention statistics for MAC, as pure functions on arrays.

Nothing here depends on a module system: the linen and NNX captures and
hand-written attention modules all reduce their probabilities with these
functions.

For a value projection, head ``h`` at query ``i`` outputs
``(Σ_j P_hij x_j) W_v``: the effective input of ``W_v`` is the
attention-mixed token, so MAC preconditions it with::

    exact:             ā_v = E_{b,h,i}[Σ_j P_bhij x_bj] = mean_b Σ_j w_bj x_bj
    product of means:  ā_v = Σ_j w_j x̄_j              (the authors' formula)

with ``w_bj = mean_{h,i} P_bhij`` the probability mass key ``j`` receives in
example ``b`` (averaged over heads and queries), ``w_j = mean_b w_bj`` and
``x̄_j = mean_b x_bj``. Query and key projections keep the plain mean ``x̄``.

Probabilities are reduced to ``w_bj`` (``[*B, Nk]``) as soon as they exist,
so no ``[B, H, Nq, Nk]`` array is ever kept for the optimizer. A
flash-attention kernel that never materializes ``P`` gets ``w_bj`` from one
vector-Jacobian product with a width-1 value, see
:func:`key_weights_from_attention`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mac_optax._src import mean_inputs
from mac_optax._src import token_mask

_HIGHEST = jax.lax.Precision.HIGHEST

EXACT = 'exact'
PRODUCT_OF_MEANS = 'product_of_means'
PLAIN = 'plain'
MODES = (EXACT, PRODUCT_OF_MEANS, PLAIN)


def check_mode(mode: str) -> str:
  """Validates an attention statistic mode."""
  if mode not in MODES:
    raise ValueError(f'mac: attention must be one of {MODES}, got {mode!r}.')
  return mode


def key_weights(probs: jax.Array,
                query_mask: Optional[jax.Array] = None) -> jax.Array:
  """``w_bj = mean_{h,i} P_bhij``: the mass each key receives.

  Framework-agnostic (used by the linen and NNX captures). With a
  `query_mask` ``m_bi`` the mean runs over real queries only,
  ``w_bj = Σ_{h,i} m_bi P_bhij / (H · max(n_b, 1))``, ``n_b = Σ_i m_bi``.

  Args:
    probs: ``[*B, H, Nq, Nk]`` attention probabilities (rows sum to one),
      masks applied, before dropout.
    query_mask: ``[*B, Nq]`` 0/1 (or boolean) real queries, or None.

  Returns:
    ``[*B, Nk]`` float32 (or wider) per-key weights, no gradient.

  Example:
    >>> p = jax.nn.softmax(jnp.zeros((2, 4, 3, 5)))
    >>> key_weights(p).shape
    (2, 5)
  """
  probs = jax.lax.stop_gradient(probs)
  heads, queries = probs.shape[-3], probs.shape[-2]
  if query_mask is not None:
    dtype = mean_inputs.stat_dtype(probs.dtype)
    m = jax.lax.stop_gradient(query_mask).astype(dtype)
    mass = jnp.einsum('...hij,...i->...j', probs, m,
                      preferred_element_type=dtype, precision=_HIGHEST)
    n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    return mass / (heads * n)
  # Heads and queries to the front, to sum them like any batch axes.
  probs = jnp.moveaxis(probs, (-3, -2), (0, 1))
  return mean_inputs.sum_leading(probs, axes=2) / (heads * queries)


def mixed_mean(weights: jax.Array, inputs: jax.Array,
               mode: str = EXACT,
               query_counts: Optional[jax.Array] = None) -> jax.Array:
  """``[1, D]`` mean attention-mixed input of a value projection.

  Framework-agnostic (used by the linen and NNX captures)::

      exact:             mean_b Σ_j w_bj x_bj
      exact, counts n_b: Σ_b n_b Σ_j w_bj x_bj / Σ_b n_b
      product_of_means:  Σ_j (mean_b w_bj)(mean_b x_bj)
      plain:             mean_{b,j} x_bj          (ignores the weights)

  With padding, `weights` average over real queries only
  (``key_weights(probs, query_mask)``) and `query_counts` ``n_b`` (the real
  queries of each example) weight the examples, so that the result is
  ``E_{b,h, real i}[Σ_j P_bhij x_bj]``.

  Args:
    weights: ``[*B, Nk]`` per-key weights from :func:`key_weights` (or
      :func:`key_weights_from_attention`); may broadcast against the batch
      axes of `inputs`.
    inputs: ``[*B, Nk, D]`` input of the value projection.
    mode: ``'exact'``, ``'product_of_means'`` or ``'plain'``.
    query_counts: ``[*B]`` real queries per example, or None (all real).

  Returns:
    ``[1, D]`` float32 statistic (the ``[G, d_in]`` contract with ``G = 1``).

  Raises:
    ValueError: `query_counts` with a mode other than ``'exact'`` (the
      other two are not defined over real queries).
  """
  check_mode(mode)
  if query_counts is not None and mode != EXACT:
    raise ValueError(f"mac: the attention statistic {mode!r} is not defined "
                     "with a token mask; use attention='exact'.")
  if mode == PLAIN:
    return mean_inputs.dense_mean(inputs)
  dtype = mean_inputs.stat_dtype(inputs.dtype)
  x = jax.lax.stop_gradient(inputs).astype(dtype)
  w = jax.lax.stop_gradient(weights).astype(dtype)
  w = jnp.broadcast_to(w, x.shape[:-1])
  if mode == PRODUCT_OF_MEANS:
    n = x.shape[-2]
    w = mean_inputs.dense_mean(w[..., None, :], axis=(-2, -1))[0]   # [Nk]
    x_bar = mean_inputs.dense_mean(x, axis=(-2, -1)).reshape(n, -1)  # [Nk, D]
    return jnp.einsum('j,jd->d', w, x_bar, precision=_HIGHEST)[None, :]
  mixed = jnp.einsum('...j,...jd->...d', w, x, precision=_HIGHEST)  # [*B, D]
  if query_counts is None:
    return mean_inputs.dense_mean(mixed)
  c = jax.lax.stop_gradient(query_counts).astype(dtype)
  c = jnp.broadcast_to(c, mixed.shape[:-1])
  total = jnp.einsum('...,...d->d', c, mixed, precision=_HIGHEST)
  return (total / jnp.maximum(jnp.sum(c), 1.0))[None, :]


def grouped_statistic(inputs: jax.Array, weights: jax.Array, *,
                      columns: str = 'qkv', mode: str = EXACT,
                      token_mask: Optional[jax.Array] = None,
                      query_counts: Optional[jax.Array] = None) -> jax.Array:
  """``[G, D]`` statistic of a fused attention projection.

  A fused projection ``x → [q | k | v]`` (one ``Dense`` to ``3·D``) splits
  its output columns into ``G = len(columns)`` equal groups (the ``G``-group
  contract of every MAC statistic). Groups ``'q'`` and ``'k'``
  get the plain mean ``x̄``, group ``'v'`` the mixed mean of
  :func:`mixed_mean`. Framework-agnostic.

  Args:
    inputs: ``[*B, N, D]`` input of the projection (queries, keys and values
      all read it: self-attention).
    weights: ``[*B, N]`` per-key weights (:func:`key_weights`).
    columns: the order of the column groups, letters from ``'q'``, ``'k'``,
      ``'v'``: ``'qkv'`` (GPT-2 ``c_attn``), ``'kv'`` (fused key/value of
      cross-attention), ``'v'`` (a value projection alone).
    mode: see :func:`mixed_mean`.
    token_mask: a capture's token mask; the plain mean runs over real
      tokens when `inputs` has token rows (the token-mask rule).
    query_counts: ``[*B]`` real queries per example (see
      :func:`mixed_mean`), or None.

  Returns:
    ``[len(columns), D]`` float32.

  Example:
    >>> x = jnp.ones((2, 5, 8)); w = jnp.full((2, 5), 0.2)
    >>> grouped_statistic(x, w).shape
    (3, 8)
  """
  if not columns or set(columns) - set('qkv'):
    raise ValueError(f"mac: columns must be letters of 'qkv', got {columns!r}.")
  plain = mean_inputs.dense_mean(inputs, mask=token_mask)
  mixed = mixed_mean(weights, inputs, mode, query_counts) if (
      'v' in columns) else None
  rows = [mixed if c == 'v' else plain for c in columns]
  return jnp.concatenate(rows, axis=0)


def key_weights_from_attention(
    attention_fn: Callable[..., jax.Array], query: jax.Array, key: jax.Array,
    query_mask: Optional[jax.Array] = None, **kwargs) -> jax.Array:
  """``w_bj`` of an attention kernel that never materializes ``P``.

  ``out_bihc = Σ_j P_bhij v_bjhc`` is linear in ``v``, so the gradient of
  ``Σ out`` with respect to a value of ones is ``Σ_i P_bhij`` (in every
  channel ``c``). One extra forward and backward pass of the kernel (no
  ``N×N`` array, flash kernels included) gives the weights. With a
  `query_mask`, the cotangent is the mask instead of ones: ``Σ_i m_bi P_bhij``,
  averaged over heads and the ``n_b`` real queries.

  Args:
    attention_fn: ``(query, key, value, **kwargs) -> out`` in the
      ``[*B, N, H, head_dim]`` layout of ``jax.nn.dot_product_attention``
      (e.g. ``functools.partial(jax.nn.dot_product_attention,
      is_causal=True, implementation='cudnn')``).
    query: ``[*B, Nq, H, hd]``.
    key: ``[*B, Nk, H, hd]``.
    query_mask: ``[*B, Nq]`` real queries (booleans or 0/1), or None.
    **kwargs: passed to `attention_fn` (masks, bias, ...).

  Returns:
    ``[*B, Nk]`` float32 weights ``mean_{h,i} P_bhij`` (no gradient).

  Example:
    >>> q = k = jnp.ones((2, 5, 4, 8))
    >>> w = key_weights_from_attention(jax.nn.dot_product_attention, q, k)
    >>> w.shape
    (2, 5)
  """
  query = jax.lax.stop_gradient(query)
  key = jax.lax.stop_gradient(key)
  heads, n_q = query.shape[-2], query.shape[-3]
  ones = jnp.ones(key.shape, query.dtype)
  out, vjp = jax.vjp(lambda v: attention_fn(query, key, v, **kwargs), ones)
  dtype = mean_inputs.stat_dtype(query.dtype)
  if query_mask is None:
    cotangent = jnp.ones(out.shape, out.dtype)
    n = jnp.asarray(float(n_q), dtype)
  else:
    m = jax.lax.stop_gradient(query_mask).astype(out.dtype)
    cotangent = jnp.broadcast_to(m[..., None, None], out.shape)
    n = jnp.maximum(jnp.sum(m.astype(dtype), axis=-1, keepdims=True), 1.0)
  (mass,) = vjp(cotangent)                                  # [*B, Nk, H, hd]
  mass = mass[..., 0].astype(dtype)                         # Σ_i m_bi P_bhij
  return jnp.einsum('...jh,h->...j', mass,
                    jnp.full((heads,), 1.0 / heads, dtype),
                    precision=_HIGHEST) / n


def token_frequencies(ids: jax.Array, vocab_size: int,
                      mask: Optional[jax.Array] = None) -> jax.Array:
  """``[1, V]`` mean one-hot input of an embedding lookup.

  An embedding lookup is ``onehot(ids) @ table`` with the table ``(V, D)``
  laid out ``(d_in, d_out)``; its mean input is the frequency of each token
  in the batch. Computed with a scatter-add, never a ``[N, V]`` one-hot.
  With a token `mask` leading `ids` (the token-mask rule), only real tokens
  are counted. Framework-agnostic.

  Args:
    ids: integer token ids, any shape.
    vocab_size: ``V``.
    mask: a capture's token mask, or None.

  Returns:
    ``[1, V]`` float32 frequencies (sum to one, or to zero for an
    all-padding batch; ids outside ``[0, V)`` are dropped).
  """
  ids = jax.lax.stop_gradient(ids)
  weights = token_mask.row_weights(mask, ids.shape, range(ids.ndim),
                                   jnp.float32)
  flat = jnp.ravel(ids).astype(jnp.int32)
  if weights is None:
    counts = jnp.zeros((vocab_size,), jnp.float32).at[flat].add(
        1.0, mode='drop')
    return (counts / max(flat.size, 1))[None, :]
  per_token = jnp.broadcast_to(
      weights.reshape(weights.shape + (1,) * (ids.ndim - weights.ndim)),
      ids.shape)
  counts = jnp.zeros((vocab_size,), jnp.float32).at[flat].add(
      jnp.ravel(per_token), mode='drop')
  other = flat.size // max(weights.size, 1)
  return (counts / token_mask.count(weights, other))[None, :]
