import os

# Tests compare against torch on CPU in float32; keep JAX on the CPU as well so
# that a developer machine with an accelerator gives the same numbers.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
