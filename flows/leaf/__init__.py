"""A leaf's own record on its machine: its resumable state, the flows' shared set-up, the round
history, and which global model it keeps and serves."""
