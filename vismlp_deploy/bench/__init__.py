"""Images per second and latency per backend x form x batch x precision, with reports.

``vismlp_deploy.bench(...)`` calls :func:`vismlp_deploy.bench.run.bench`.
"""
from .._callable_module import make_callable

make_callable(__name__, "run", "bench")
