"""Comparing runners: statistics, equivalence proofs, real images, bisection."""
