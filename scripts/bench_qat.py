"""Median time of one jitted training step, float vs QAT (goal: QAT <= 1.5x float).

A step is forward + backward + an optax Adam update on a regression loss; the QAT
step also updates the observers' running statistics (``quant_stats`` mutable), as
QAT training does. Prints a table and writes JSON.

    python scripts/bench_qat.py [--repeats 20] [--json bench_results/bench_qat.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_qmha import MultiheadAttention, get_default_qat_qconfig


def make_step(module, optimizer, qat: bool):
  def loss_fn(params, stats, q, target):
    variables = {"params": params, **({"quant_stats": stats} if qat else {})}
    if qat:
      (out, _), updates = module.apply(variables, q, q, q, need_weights=False,
                                       mutable=["quant_stats"])
      stats = updates["quant_stats"]
    else:
      out, _ = module.apply(variables, q, q, q, need_weights=False)
    return jnp.mean((out - target) ** 2), stats

  @jax.jit
  def step(params, stats, opt_state, q, target):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, q, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return step


def time_step(module, qat: bool, q, target, repeats: int) -> float:
  variables = module.init(jax.random.key(0), q, q, q)
  params = variables["params"]
  stats = variables.get("quant_stats", {})
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  step = make_step(module, optimizer, qat)
  state = (params, stats, opt_state)
  for _ in range(3):  # compile and warm up
    *state, loss = step(*state, q, target)
  jax.block_until_ready(loss)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    *state, loss = step(*state, q, target)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--shape", type=int, nargs=4, default=(512, 8, 128, 8),
                      metavar=("E", "H", "L", "N"))
  parser.add_argument("--json", default="bench_results/bench_qat.json")
  args = parser.parse_args()
  e, h, l, n = args.shape
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(l, n, e)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(l, n, e)), jnp.float32)
  float_s = time_step(MultiheadAttention(e, h), False, q, target, args.repeats)
  qat_s = time_step(MultiheadAttention(e, h, qconfig=get_default_qat_qconfig("x86")), True,
                    q, target, args.repeats)
  rows = [("float step", float_s), ("QAT step (x86 qconfig)", qat_s)]
  print(f"(E, H, L, N) = {tuple(args.shape)}, backend {jax.default_backend()},"
        f" median of {args.repeats}")
  print(f"{'':28s} {'ms':>9s}")
  for name, seconds in rows:
    print(f"{name:28s} {1e3 * seconds:9.2f}")
  ratio = qat_s / float_s
  print(f"{'QAT / float':28s} {ratio:9.2f}x   (goal <= 1.50x: {'met' if ratio <= 1.5 else 'NOT met'})")
  result = {
      "shape": dict(zip("EHLN", args.shape)), "repeats": args.repeats,
      "backend": jax.default_backend(), "machine": platform.machine(),
      "cpu_count": os.cpu_count(), "float_step_ms": 1e3 * float_s,
      "qat_step_ms": 1e3 * qat_s, "qat_over_float": ratio,
  }
  path = pathlib.Path(args.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
