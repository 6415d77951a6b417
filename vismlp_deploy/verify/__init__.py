"""Comparing runners: statistics, equivalence proofs, real images, bisection.

``vismlp_deploy.verify(...)`` calls :func:`vismlp_deploy.verify.compare.verify`.
"""
from .._callable_module import make_callable

make_callable(__name__, "compare", "verify")
