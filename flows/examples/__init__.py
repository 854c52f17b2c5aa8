"""Runnable example participants."""
