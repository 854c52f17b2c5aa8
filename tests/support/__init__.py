"""Helpers the tests share: real servers and processes, a leaf speaking the protocol by hand, faults."""
