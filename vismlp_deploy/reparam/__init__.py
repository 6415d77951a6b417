"""Exact structural re-parameterization: pure transforms, the model walker, the report."""
from .report import ReparamReport
from .walker import ReparamContext, reparameterize

__all__ = ["ReparamContext", "ReparamReport", "reparameterize"]
