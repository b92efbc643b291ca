"""Fixtures shared by test files."""

import pytest

from mac_optax._src import rank_one


@pytest.fixture(params=['reduction', 'dot'])
def projection(request, monkeypatch):
  """Both forms of ``ãᵀĜ``: small kernels' reduction, large kernels' dot."""
  monkeypatch.setattr(rank_one, 'DOT_FROM',
                      0 if request.param == 'dot' else 2**62)
  return request.param
