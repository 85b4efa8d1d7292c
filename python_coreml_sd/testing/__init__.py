"""Deterministic stand-ins for the models, shared by Python tests and the Swift golden vectors."""
