"""Analytic toy lab: finite-response policies, exact optima, population losses (vmappable)."""
