"""Files of whole attention modules: their variables plus what rebuilds the modules.

``save_modules`` writes ``{prefix: (module, variables)}`` (what
``from_torch_checkpoint`` returns) as one variables file whose metadata records
each module's class and fields as JSON; ``load_modules`` rebuilds them. Only the
two attention classes of this library can be named, so loading executes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_qmha._errors import CheckpointError
from flax_qmha._export import load_variables, save_variables
from flax_qmha._mha import MultiheadAttention
from flax_qmha._qconfig import QConfig, QuantSpec
from flax_qmha._quantized_mha import QuantizedMultiheadAttention

CLASSES = {cls.__name__: cls for cls in (MultiheadAttention, QuantizedMultiheadAttention)}
METADATA_KEY = "flax_qmha_modules"


def _field_to_json(name: str, value: Any) -> Any:
  if isinstance(value, QConfig):
    return {"activation": dataclasses.asdict(value.activation),
            "weight": dataclasses.asdict(value.weight), "fake_quant": value.fake_quant}
  if name in ("dtype", "param_dtype") and value is not None:
    return np.dtype(value).name
  return value


def _field_from_json(name: str, value: Any) -> Any:
  if name == "qconfig" and value is not None:
    return QConfig(activation=QuantSpec(**value["activation"]),
                   weight=QuantSpec(**value["weight"]), fake_quant=value["fake_quant"])
  if name in ("dtype", "param_dtype") and value is not None:
    return jnp.dtype(value)
  return value


def _fields(module) -> dict:
  return {f.name: _field_to_json(f.name, getattr(module, f.name))
          for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


def save_modules(path, modules: Mapping[str, tuple[Any, Mapping]], *, format=None) -> None:
  """Writes ``{prefix: (module, variables)}`` to one ``.safetensors``/``.msgpack`` file.

  Args:
    path: destination path (or binary file object with ``format``).
    modules: prefixes (no ``"/"``) -> ``(MultiheadAttention or
      QuantizedMultiheadAttention, variables)``.
    format: ``"safetensors"``, ``"msgpack"`` or ``None`` (from the extension).
  """
  if not isinstance(modules, Mapping):
    raise TypeError(f"save_modules: modules must be a mapping of prefix -> (module, variables),"
                    f" got {type(modules).__name__}")
  if not modules:
    raise ValueError("save_modules: modules is empty; nothing to save")
  description = {}
  for prefix, pair in modules.items():
    if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[1], Mapping):
      got = (f"({', '.join(type(x).__name__ for x in pair)})" if isinstance(pair, tuple)
             else type(pair).__name__)
      raise TypeError(f"save_modules: modules[{prefix!r}] must be a (module, variables mapping)"
                      f" pair, got {got}")
    module = pair[0]
    if type(module).__name__ not in CLASSES or not isinstance(module, tuple(CLASSES.values())):
      raise TypeError(
          f"save_modules: modules[{prefix!r}] must be a MultiheadAttention or"
          f" QuantizedMultiheadAttention, got {type(module).__name__}"
      )
    description[prefix] = {"class": type(module).__name__, "fields": _fields(module)}
  variables = {prefix: dict(v) for prefix, (_, v) in modules.items()}
  save_variables(path, variables, format=format,
                 metadata={METADATA_KEY: json.dumps(description, sort_keys=True)})


def load_modules(path, *, format=None) -> dict[str, tuple[Any, dict]]:
  """Reads a file written by :func:`save_modules` (e.g. by ``flax-qmha convert``).

  Returns:
    ``{prefix: (module, variables)}`` with modules rebuilt from their recorded fields.

  Raises:
    CheckpointError: the file is not a modules file or its description is malformed.
  """
  variables, metadata = load_variables(path, format=format, return_metadata=True)
  if METADATA_KEY not in metadata:
    raise CheckpointError(
        f"load_modules: {path!s} holds variables but no module description (metadata key"
        f" {METADATA_KEY!r}); read it with load_variables instead"
    )
  try:
    description = json.loads(metadata[METADATA_KEY])
    result = {}
    for prefix, entry in description.items():
      cls = CLASSES[entry["class"]]
      fields = {k: _field_from_json(k, v) for k, v in entry["fields"].items()}
      result[prefix] = (cls(**fields), variables[prefix])
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(
        f"load_modules: {path!s} has a malformed module description ({type(e).__name__}: {e})"
    ) from None
  return result
