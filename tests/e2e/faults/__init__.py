"""The fault suite: a federation of real processes under one fault each (`pytest -m fault`)."""
