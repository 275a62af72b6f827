"""Leaving flax-qmha: Flax's own attention module, torch's state_dict, checkpoint files.

* :func:`to_flax_attention` rebuilds a float ``MultiheadAttention`` as
  ``flax.linen.MultiHeadDotProductAttention`` with the same outputs;
  :func:`torch_masks_to_flax_mask` turns torch-style masks into Flax's boolean mask.
* :func:`to_torch_state_dict` gives ``torch.nn.MultiheadAttention``'s state_dict as numpy.
* :func:`save_variables` / :func:`load_variables` write and read a variables pytree as
  safetensors or Flax msgpack, executing nothing on load.

Only jax, flax and numpy are imported; torch is never needed.
"""

from __future__ import annotations

import collections.abc
import os
import secrets
from typing import Any, BinaryIO, Mapping, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from flax_qmha import _checks
from flax_qmha import _safetensors
from flax_qmha._errors import CheckpointError, source_label
from flax_qmha._mha import MultiheadAttention
from flax_qmha._torch_layout import IN_PROJECTIONS, state_dict_from_params

__all__ = [
    "FORMATS",
    "load_variables",
    "save_variables",
    "to_flax_attention",
    "to_torch_state_dict",
    "torch_masks_to_flax_mask",
]

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]

# Checkpoint format name -> file extension.
FORMATS = {"safetensors": ".safetensors", "msgpack": ".msgpack"}
# The value stored under "format" in both formats' metadata, so that a loader can tell our
# files from other safetensors files (Hugging Face writes "pt", "tf", ...).
FORMAT_MARKER = "flax-qmha"
_SEPARATOR = "/"
# Our projection name -> flax.linen.MultiHeadDotProductAttention's.
_FLAX_NAMES = {"linear_Q": "query", "linear_K": "key", "linear_V": "value", "out_proj": "out"}


# ---------------------------------------------------------------------------------------------
# float modules and their parameters


def _float_module_and_params(module: Any, variables: Any, caller: str):
  """``(MultiheadAttention, params)`` for ``module``, dequantizing an int8 module first.

  The int8 module is handled by ``flax_qmha._convert.dequantize`` when that function exists;
  it is looked up at call time so that this layer does not depend on the conversion flow.
  """
  if not isinstance(module, MultiheadAttention):
    dequantize = None
    if isinstance(module, nn.Module):
      try:
        from flax_qmha._convert import dequantize  # pylint: disable=g-import-not-at-top
      except ImportError:
        pass
    if dequantize is None:
      raise TypeError(
          f"{caller}: module must be a flax_qmha.MultiheadAttention (or an int8"
          f" QuantizedMultiheadAttention once flax_qmha.dequantize is available), got"
          f" {type(module).__module__}.{type(module).__qualname__}"
      )
    result = dequantize(module, variables)
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], MultiheadAttention)
    ):
      raise TypeError(
          f"{caller}: dequantize({type(module).__name__}, variables) must return"
          f" (MultiheadAttention, variables), got {type(result).__name__}"
      )
    module, variables = result
  _checks.check_config(
      embed_dim=module.embed_dim, num_heads=module.num_heads, dropout=module.dropout,
      kdim=module.kdim, vdim=module.vdim, owner=caller,
  )
  _checks.check_bool_fields(caller, bias=module.bias, add_bias_kv=module.add_bias_kv,
                            add_zero_attn=module.add_zero_attn, batch_first=module.batch_first)
  return module, _checked_params(module, variables, caller)


def _checked_params(module: MultiheadAttention, variables: Any, caller: str) -> Mapping:
  """``variables["params"]`` after checking its keys and shapes against ``module``."""
  if not isinstance(variables, collections.abc.Mapping) or "params" not in variables:
    got = (
        f"a mapping with keys {sorted(variables)}"
        if isinstance(variables, collections.abc.Mapping)
        else type(variables).__name__
    )
    raise ValueError(f"{caller}: variables must be a mapping with a 'params' entry, got {got}")
  params = variables["params"]
  e = module.embed_dim
  in_dims = {
      "linear_Q": e,
      "linear_K": e if module.kdim is None else module.kdim,
      "linear_V": e if module.vdim is None else module.vdim,
      "out_proj": e,
  }
  expected: dict[str, tuple[int, ...]] = {}
  for name, in_dim in in_dims.items():
    expected[f"{name}/kernel"] = (in_dim, e)
    if module.bias:
      expected[f"{name}/bias"] = (e,)
  if module.add_bias_kv:
    expected["bias_k"] = expected["bias_v"] = (1, 1, e)
  try:
    found = _flatten(params, "variables['params']")
  except (TypeError, ValueError) as err:
    raise ValueError(f"{caller}: {err}") from err
  missing = sorted(expected.keys() - found.keys())
  if missing:
    raise ValueError(
        f"{caller}: params/{', params/'.join(missing)} missing; {_describe(module)} has"
        f" {sorted(expected)}"
    )
  unexpected = sorted(found.keys() - expected.keys())
  if unexpected:
    raise ValueError(
        f"{caller}: params/{', params/'.join(unexpected)} unexpected; {_describe(module)} has"
        f" {sorted(expected)}"
    )
  for key, shape in expected.items():
    if tuple(np.shape(found[key])) != shape:
      raise ValueError(
          f"{caller}: params/{key} has shape {tuple(np.shape(found[key]))}, expected {shape}"
          f" for {_describe(module)}"
      )
  return params


def _describe(module: MultiheadAttention) -> str:
  return (
      f"MultiheadAttention(embed_dim={module.embed_dim}, kdim={module.kdim},"
      f" vdim={module.vdim}, bias={module.bias}, add_bias_kv={module.add_bias_kv})"
  )


# ---------------------------------------------------------------------------------------------
# flax.linen.MultiHeadDotProductAttention


def to_flax_attention(
    module: MultiheadAttention, variables: Mapping
) -> tuple[nn.MultiHeadDotProductAttention, dict]:
  """Rebuilds ``module`` as Flax's ``MultiHeadDotProductAttention`` with the same outputs.

  The returned module is configured so that, given the same inputs in Flax's layout and the
  equivalent mask, its output equals ``module``'s attention output (up to float rounding):
  ``qkv_features = out_features = embed_dim``, ``use_bias = bias``, ``dropout_rate = dropout``
  with per-element dropout (``broadcast_dropout=False``, as torch drops each weight
  independently), the softmax in float32 (``force_fp32_for_softmax=True``), and ``dtype`` /
  ``param_dtype`` copied. Only ``params`` are used: a module with a ``qconfig`` is exported
  as its float model, without observers or fake quantization.

  Where Flax's module differs from ``MultiheadAttention``:

  * Layout: inputs are batch-leading ``[batch..., length, features]`` (any number of batch
    axes, or none); transpose torch's seq-first ``(L, N, E)`` to ``(N, L, E)`` first.
    ``key``/``value`` may have their own feature sizes (``kdim``/``vdim``) as here.
  * Masks: one boolean ``mask`` broadcastable to ``[batch..., num_heads, L, S]`` where
    ``True`` means *attend* (torch's bool masks mean the opposite); there is no
    ``key_padding_mask`` argument, no ``is_causal`` flag (pass a causal mask, e.g.
    ``nn.make_causal_mask``) and no additive float masks (only ``0``/``-inf`` masks have a
    boolean equivalent). :func:`torch_masks_to_flax_mask` builds the mask from torch's
    arguments.
  * A query whose keys are all masked attends uniformly to every key (Flax replaces masked
    logits by the dtype's smallest value); here its weights are 0 and its output is
    ``out_proj``'s bias.
  * No attention weights are returned; ``sow_weights=True`` stores the per-head weights
    ``[batch..., num_heads, L, S]`` in the ``intermediates`` collection.
  * ``deterministic`` has no default when ``dropout > 0``: pass it at call time (Flax's
    ``merge_param`` convention), together with a ``dropout`` rng or ``dropout_rng``. The
    random dropout masks differ from ours.
  * ``add_bias_kv`` and ``add_zero_attn`` cannot be expressed and are refused.

  Example::

    flax_mha, flax_vars = to_flax_attention(mha, variables)
    mask = torch_masks_to_flax_mask(attn_mask, key_padding_mask, num_heads=mha.num_heads)
    out = flax_mha.apply(flax_vars, q, k, v, mask=mask)   # == mha.apply(...)[0]

  Args:
    module: a float ``MultiheadAttention`` (an int8 ``QuantizedMultiheadAttention`` is
      dequantized first when ``flax_qmha.dequantize`` is available).
    variables: its variables; ``variables["params"]`` in the layout documented on
      ``MultiheadAttention``. Other collections are ignored.

  Returns:
    ``(flax_module, flax_variables)``: ``flax_variables = {"params": {"query", "key",
    "value": {"kernel": (in_features, H, D), "bias": (H, D)}, "out": {"kernel": (H, D, E),
    "bias": (E,)}}}`` (no ``bias`` entries when ``bias=False``), ``D = embed_dim // H``.

  Raises:
    TypeError: ``module`` is not a ``MultiheadAttention``.
    ValueError: ``module`` uses ``add_bias_kv`` or ``add_zero_attn``, or ``variables`` do not
      hold its parameters with the right shapes.
  """
  module, params = _float_module_and_params(module, variables, "to_flax_attention")
  for flag in ("add_bias_kv", "add_zero_attn"):
    if getattr(module, flag):
      raise ValueError(
          f"to_flax_attention: module has {flag}=True, which"
          " flax.linen.MultiHeadDotProductAttention cannot express (it has no extra key/value"
          f" position); expected {flag}=False"
      )
  h = module.num_heads
  d = module.embed_dim // h
  flax_module = nn.MultiHeadDotProductAttention(
      num_heads=h,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      qkv_features=module.embed_dim,
      out_features=module.embed_dim,
      broadcast_dropout=False,
      dropout_rate=module.dropout,
      use_bias=module.bias,
      force_fp32_for_softmax=True,
  )
  flax_params: dict[str, dict[str, jax.Array]] = {}
  for name in IN_PROJECTIONS:
    kernel = jnp.asarray(params[name]["kernel"])
    # Our heads are contiguous blocks of D features, as torch's: [in, E] -> [in, H, D].
    flax_params[_FLAX_NAMES[name]] = {"kernel": kernel.reshape(kernel.shape[0], h, d)}
    if module.bias:
      flax_params[_FLAX_NAMES[name]]["bias"] = jnp.asarray(params[name]["bias"]).reshape(h, d)
  out_kernel = jnp.asarray(params["out_proj"]["kernel"])  # [E, E]
  flax_params["out"] = {"kernel": out_kernel.reshape(h, d, out_kernel.shape[-1])}
  if module.bias:
    flax_params["out"]["bias"] = jnp.asarray(params["out_proj"]["bias"])
  return flax_module, {"params": flax_params}


def _allowed_positions(mask: Any, name: str) -> jax.Array | None:
  """A torch mask (bool ``True`` = masked, or float ``0``/``-inf``) as Flax's ``True`` = attend."""
  if mask is None:
    return None
  if isinstance(mask, jax.core.Tracer):
    if mask.dtype == jnp.bool_:
      return jnp.logical_not(mask)
    raise TypeError(
        f"torch_masks_to_flax_mask: {name} must be a bool mask when traced (under jit), got"
        f" dtype {mask.dtype}; a float mask's values can only be checked outside jit"
    )
  array = np.asarray(mask)
  if array.dtype == np.bool_:
    return jnp.asarray(~array)
  if not np.issubdtype(array.dtype, np.floating) and array.dtype != jnp.bfloat16:
    raise TypeError(
        f"torch_masks_to_flax_mask: {name} must be a bool mask (True = masked) or a float"
        f" mask of 0 and -inf, got dtype {array.dtype}"
    )
  values = array.astype(np.float32)
  bad = ~((values == 0) | (values == -np.inf))
  if bad.any():
    raise ValueError(
        f"torch_masks_to_flax_mask: {name} holds the additive value {float(values[bad][0])}; Flax's"
        " boolean mask can only express 0 (attend) and -inf (masked)"
    )
  return jnp.asarray(values == 0)


def torch_masks_to_flax_mask(
    attn_mask: Any = None,
    key_padding_mask: Any = None,
    *,
    num_heads: int,
    is_causal: bool = False,
    batched: bool = True,
    length: int | None = None,
) -> jax.Array | None:
  """Flax's boolean attention mask equivalent to ``MultiheadAttention``'s mask arguments.

  Args:
    attn_mask: as for ``MultiheadAttention``: ``(L, S)`` or ``(N * num_heads, L, S)``
      (``(num_heads, L, S)`` when not ``batched``); bool (``True`` = not allowed) or float
      with only ``0`` and ``-inf``. Float masks must be concrete (not traced); bool masks may
      be traced.
    key_padding_mask: ``(N, S)`` (``(S,)`` when not ``batched``); bool (``True`` = ignore the
      key) or float with only ``0`` and ``-inf``.
    num_heads: the module's number of heads, to unflatten a 3-D ``attn_mask``.
    is_causal: without ``attn_mask``, add a causal mask (self-attention, ``L == S``); with
      ``attn_mask`` it is ignored, as ``MultiheadAttention`` does.
    batched: whether the inputs have a batch axis (``(N, L, E)`` for Flax).
    length: ``L`` for a causal mask when ``key_padding_mask`` is not given (else its ``S``).

  Returns:
    ``None`` when there is no mask, else a bool array where ``True`` means *attend*, shaped
    ``[N|1, H|1, L|1, S]`` (``[H|1, L|1, S]`` when not ``batched``): broadcastable to Flax's
    ``[batch, num_heads, L, S]``, with size-1 axes where the masks do not vary.

  Raises:
    TypeError: a mask has an integer dtype, or a float mask is traced.
    ValueError: a float mask holds values other than ``0`` and ``-inf``; shapes are wrong or
      disagree; ``is_causal`` without any length.
  """
  if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
    raise ValueError(
        f"torch_masks_to_flax_mask: num_heads must be a positive int, got {num_heads!r}"
    )
  allowed = _allowed_positions(attn_mask, "attn_mask")  # [L, S] or [N*H | H, L, S]
  keys = _allowed_positions(key_padding_mask, "key_padding_mask")  # [N, S] or [S]
  lead = 1 if batched else 0  # batch axes in the result
  if keys is not None:
    if keys.ndim != lead + 1:
      expected = "(N, S)" if batched else "(S,)"
      raise ValueError(
          f"torch_masks_to_flax_mask: key_padding_mask must be {expected} (batched={batched}),"
          f" got shape {keys.shape}"
      )
    keys = keys.reshape(keys.shape[:-1] + (1, 1, keys.shape[-1]))  # [N, 1, 1, S] or [1, 1, S]
  if allowed is None and is_causal:
    if length is None and keys is None:
      raise ValueError(
          "torch_masks_to_flax_mask: is_causal=True needs the sequence length: pass"
          " key_padding_mask or length"
      )
    n = keys.shape[-1] if length is None else length
    allowed = jnp.tril(jnp.ones((n, n), dtype=bool))
  if allowed is not None:
    if allowed.ndim == 2:
      allowed = allowed.reshape((1,) * (lead + 1) + allowed.shape)
    elif allowed.ndim == 3:
      stacked = allowed.shape[0]
      if batched and stacked % num_heads:
        raise ValueError(
            f"torch_masks_to_flax_mask: a 3-D attn_mask must be (N * num_heads, L, S) with"
            f" num_heads={num_heads}, got shape {allowed.shape}"
        )
      if not batched and stacked != num_heads:
        raise ValueError(
            f"torch_masks_to_flax_mask: an unbatched 3-D attn_mask must be (num_heads, L, S)"
            f" with num_heads={num_heads}, got shape {allowed.shape}"
        )
      # torch's (N * H) axis is batch-major, head-minor.
      allowed = allowed.reshape((stacked // num_heads,) * lead + (num_heads,) + allowed.shape[1:])
    else:
      raise ValueError(
          f"torch_masks_to_flax_mask: attn_mask must be 2-D or 3-D, got shape {allowed.shape}"
      )
  if allowed is None:
    return keys
  if keys is None:
    return allowed
  if allowed.shape[-1] != keys.shape[-1]:
    raise ValueError(
        f"torch_masks_to_flax_mask: attn_mask covers {allowed.shape[-1]} keys but"
        f" key_padding_mask covers {keys.shape[-1]}"
    )
  if batched and allowed.shape[0] not in (1, keys.shape[0]):
    raise ValueError(
        f"torch_masks_to_flax_mask: attn_mask holds {allowed.shape[0]} batches of heads but"
        f" key_padding_mask has {keys.shape[0]} rows"
    )
  return jnp.logical_and(allowed, keys)


# ---------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention


def to_torch_state_dict(module: MultiheadAttention, variables: Mapping) -> dict[str, np.ndarray]:
  """``torch.nn.MultiheadAttention``'s state_dict for ``module``'s parameters, as numpy.

  It loads with ``strict=True`` into ``torch.nn.MultiheadAttention(embed_dim, num_heads,
  dropout=dropout, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
  kdim=kdim, vdim=vdim, batch_first=batch_first)`` built from ``module``'s fields
  (``torch.from_numpy`` on each value), and that torch module then computes what ``module``
  computes. Q/K/V are packed into ``in_proj_weight`` when ``kdim == vdim == embed_dim``, as
  torch does, else stored as ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``.

  Args:
    module: a float ``MultiheadAttention`` (its ``qconfig`` is ignored: only ``params`` are
      read). Any other flax module is passed to ``flax_qmha._convert.dequantize`` first
      when that function exists, so that an int8 ``QuantizedMultiheadAttention`` exports its
      dequantized weights.
    variables: its variables, with ``params`` in ``MultiheadAttention``'s layout.

  Returns:
    Names -> fresh, writable, C-contiguous numpy arrays in the parameters' dtype (float32
    by default).

  Raises:
    TypeError: ``module`` is neither a ``MultiheadAttention`` nor dequantizable.
    ValueError: ``variables`` do not hold ``module``'s parameters with the right shapes.
  """
  _, params = _float_module_and_params(module, variables, "to_torch_state_dict")
  # Copies: views of jax buffers are read-only, which torch.from_numpy warns about.
  return {name: np.array(value) for name, value in state_dict_from_params(params).items()}


# ---------------------------------------------------------------------------------------------
# checkpoint files


def _flatten(tree: Any, what: str, prefix: str = "") -> dict[str, Any]:
  """Nested mappings -> ``{"a/b/c": leaf}``; mappings with no entries are refused."""
  if not isinstance(tree, collections.abc.Mapping):
    raise TypeError(
        f"{what} must be a mapping of str to arrays or mappings, got {type(tree).__name__}"
    )
  if not tree:
    where = f"at {prefix!r}" if prefix else "at the top level"
    raise ValueError(
        f"{what} has an empty mapping {where}; safetensors cannot store one, so neither"
        " format does (expected at least one array under every mapping)"
    )
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if not isinstance(key, str) or not key or _SEPARATOR in key:
      raise ValueError(
          f"{what} has the key {key!r} under {prefix or 'the top level'!r}; expected a"
          f" non-empty str without {_SEPARATOR!r} (keys are joined with it)"
      )
    path = f"{prefix}{_SEPARATOR}{key}" if prefix else key
    if isinstance(value, collections.abc.Mapping):
      flat.update(_flatten(value, what, path))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, np.ndarray], label: str) -> dict:
  """``{"a/b/c": leaf}`` -> nested dicts, keys in sorted order."""
  tree: dict = {}
  for path in sorted(flat):
    parts = path.split(_SEPARATOR)
    if not all(parts):
      raise CheckpointError(f"{label}: the tensor name {path!r} has an empty path component")
    node = tree
    for i, part in enumerate(parts[:-1]):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise CheckpointError(
            f"{label}: {_SEPARATOR.join(parts[: i + 1])!r} is both an array and a subtree"
        )
    if parts[-1] in node:
      raise CheckpointError(f"{label}: {path!r} is both an array and a subtree")
    node[parts[-1]] = flat[path]
  return tree


def _leaf_array(value: Any, key: str) -> np.ndarray:
  """A variables leaf as a numpy array of a dtype both formats store."""
  if isinstance(value, (str, bytes)) or value is None:
    raise TypeError(f"variables[{key!r}] must be an array or number, got {type(value).__name__}")
  array = np.asarray(value)
  if _safetensors._code_for(array.dtype) is None:  # pylint: disable=protected-access
    raise TypeError(
        f"variables[{key!r}] has dtype {array.dtype}, which safetensors cannot store; expected"
        " a float64/32/16, bfloat16, float8, complex64, (u)int64/32/16/8 or bool array"
    )
  return array


def _check_metadata(metadata: Any) -> dict[str, str]:
  metadata = _safetensors.check_metadata(metadata)  # both formats store the same metadata
  if "format" in metadata:
    raise ValueError(
        f"metadata may not use the key 'format': it holds the file's format marker"
        f" {FORMAT_MARKER!r}; got format={metadata['format']!r}"
    )
  return dict(metadata)


def _resolve_format(
    path_or_file: Any, format: str | None  # pylint: disable=redefined-builtin
) -> str:
  """The checkpoint format: ``format`` if given, else from the path's extension."""
  if format is not None:
    if format not in FORMATS:
      raise ValueError(f"format must be one of {sorted(FORMATS)} or None, got {format!r}")
    return format
  if not isinstance(path_or_file, (str, os.PathLike)):
    raise ValueError(
        f"format must be given ({sorted(FORMATS)}) when writing to or reading from a file"
        f" object, got format=None for {source_label(path_or_file)}"
    )
  name = os.fspath(path_or_file)
  for fmt, ext in FORMATS.items():
    if str(name).lower().endswith(ext):
      return fmt
  raise ValueError(
      f"cannot tell the format of {name!r} from its extension; expected a name ending in"
      f" {' or '.join(FORMATS.values())}, or format= one of {sorted(FORMATS)}"
  )


def _write(path_or_file: PathOrFile, write) -> None:
  """Calls ``write(f)`` on a binary file; a path is replaced atomically when done."""
  if isinstance(path_or_file, (str, os.PathLike)):
    path = os.fspath(path_or_file)
    directory, name = os.path.split(os.path.abspath(path))
    # Created with open() rather than mkstemp so that the file gets the umask's permissions.
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
      with open(tmp, "xb") as f:
        write(f)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
  elif hasattr(path_or_file, "write"):
    write(path_or_file)
  else:
    raise TypeError(
        f"path must be a path or a binary file object, got {type(path_or_file).__name__}"
    )


def save_variables(
    path: PathOrFile,
    variables: Mapping,
    *,
    format: str | None = None,  # pylint: disable=redefined-builtin
    metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes a Flax variables pytree as safetensors or Flax msgpack.

  Both formats hold the same thing: every leaf as an array of its own dtype and shape (0-d
  arrays included), under its path of mapping keys, and ``metadata`` with ``"format":
  "flax-qmha"``.

  * safetensors: one tensor per leaf, named by its keys joined with ``"/"``
    (``"params/linear_Q/kernel"``); the metadata is the file's ``__metadata__``. Readable by
    ``safetensors.numpy.load_file``.
  * msgpack: ``flax.serialization.msgpack_serialize({"format": "flax-qmha", "metadata":
    metadata, "variables": variables})``.

  Args:
    path: destination path (replaced atomically: written to a temporary file in the same
      directory, then renamed), or a binary file object opened for writing.
    variables: nested mappings (dicts, ``FrozenDict``) with str keys that do not contain
      ``"/"``; leaves are arrays (numpy, jax) or numbers, stored as ``np.asarray(leaf)`` in
      any dtype safetensors supports (float64/32/16, bfloat16, float8_e4m3fn/e5m2,
      complex64, int64/32/16/8, uint64/32/16/8, bool). Every mapping must hold at least one
      leaf: safetensors has no way to store an empty one.
    format: ``"safetensors"`` or ``"msgpack"``; ``None`` chooses from ``path``'s extension
      (``.safetensors``, ``.msgpack``), and is not allowed for file objects.
    metadata: optional str -> str pairs stored with the arrays (the key ``"format"`` is
      reserved); :func:`load_variables` returns them with ``return_metadata=True``.

  Returns:
    None.

  Raises:
    ValueError: unknown format or extension, a bad key, an empty mapping, or a reserved
      metadata key.
    TypeError: a leaf's dtype cannot be stored, or ``variables``/``metadata`` have the wrong
      type.
  """
  fmt = _resolve_format(path, format)
  meta = _check_metadata(metadata)
  flat = {key: _leaf_array(value, key) for key, value in _flatten(variables, "variables").items()}
  if fmt == "safetensors":
    _write(
        path,
        lambda f: _safetensors.save_safetensors(f, flat, {"format": FORMAT_MARKER, **meta}),
    )
  else:
    wrapper = {"format": FORMAT_MARKER, "metadata": meta, "variables": _unflatten(flat, "")}
    data = serialization.msgpack_serialize(wrapper, in_place=True)
    _write(path, lambda f: f.write(data))


def _read_bytes(path_or_file: PathOrFile) -> bytes:
  if isinstance(path_or_file, (str, os.PathLike)):
    with open(path_or_file, "rb") as f:
      return f.read()
  if hasattr(path_or_file, "read"):
    data = path_or_file.read()
    if not isinstance(data, bytes):
      raise TypeError("path must be a path or a file object opened in binary mode")
    return data
  raise TypeError(f"path must be a path or a binary file object, got {type(path_or_file).__name__}")


def _load_msgpack(path_or_file: PathOrFile, label: str) -> tuple[dict[str, np.ndarray], dict]:
  data = _read_bytes(path_or_file)
  try:
    # Decodes only msgpack values and flax's (shape, dtype name, bytes) arrays: no code runs.
    tree = serialization.msgpack_restore(data)
  except Exception as err:  # msgpack and numpy raise many types on corrupt input
    raise CheckpointError(
        f"{label}: not a Flax msgpack file ({type(err).__name__}: {err})"
    ) from err
  if not isinstance(tree, dict):
    raise CheckpointError(f"{label}: expected a msgpack map at the top, got {type(tree).__name__}")
  marker = tree.get("format")
  metadata: Any = {}
  if isinstance(marker, str):
    if marker != FORMAT_MARKER:
      raise CheckpointError(f"{label}: format is {marker!r}, expected {FORMAT_MARKER!r}")
    if set(tree) != {"format", "metadata", "variables"}:
      raise CheckpointError(
          f"{label}: expected the keys ['format', 'metadata', 'variables'], got {sorted(tree)}"
      )
    metadata, tree = tree["metadata"], tree["variables"]
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
      raise CheckpointError(f"{label}: metadata must map str to str")
  # Without the marker: a plain flax.serialization.msgpack_serialize(variables) file.
  try:
    flat = _flatten(tree, "the stored variables")
  except (TypeError, ValueError) as err:
    raise CheckpointError(f"{label}: {err}") from err
  arrays = {}
  for key, value in flat.items():
    if not isinstance(value, (np.ndarray, np.generic, bool, int, float)):
      raise CheckpointError(f"{label}: {key!r} holds a {type(value).__name__}, not an array")
    array = np.array(value)  # a fresh, writable copy of the read-only buffer view
    if _safetensors._code_for(array.dtype) is None:  # pylint: disable=protected-access
      raise CheckpointError(f"{label}: {key!r} has the unsupported dtype {array.dtype}")
    arrays[key] = array
  return arrays, metadata


def _load_safetensors(path_or_file: PathOrFile, label: str) -> tuple[dict[str, np.ndarray], dict]:
  arrays, metadata = _safetensors.load_safetensors(path_or_file)
  marker = metadata.pop("format", None)
  if marker is not None and marker != FORMAT_MARKER:
    raise CheckpointError(
        f"{label}: format is {marker!r}, expected {FORMAT_MARKER!r} (a file of another"
        " library; read it with flax_qmha._safetensors.load_safetensors)"
    )
  if not arrays:
    raise CheckpointError(f"{label}: the file holds no tensors")
  return arrays, metadata


def _check_template(flat: Mapping[str, np.ndarray], template: Any, label: str) -> None:
  try:
    expected = _flatten(template, "template")
  except TypeError as err:
    raise TypeError(f"load_variables: {err}") from err
  for key in sorted(expected.keys() - flat.keys()):
    raise ValueError(f"load_variables: {label} lacks {key!r}, which template has")
  for key in sorted(flat.keys() - expected.keys()):
    raise ValueError(f"load_variables: {label} has {key!r}, which template lacks")
  for key in sorted(expected):
    leaf = expected[key]
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
    dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if flat[key].shape != shape or flat[key].dtype != dtype:
      raise ValueError(
          f"load_variables: {key!r} in {label} is {flat[key].dtype}{list(flat[key].shape)},"
          f" but template expects {dtype}{list(shape)}"
      )


def load_variables(
    path: PathOrFile,
    *,
    format: str | None = None,  # pylint: disable=redefined-builtin
    template: Any = None,
    return_metadata: bool = False,
):
  """Reads a variables pytree written by :func:`save_variables`, executing nothing.

  Also reads plain ``flax.serialization.msgpack_serialize(variables)`` files and
  safetensors files without a ``"format"`` metadata entry whose tensor names are
  ``"/"``-joined paths.

  Args:
    path: a path, or a binary file object (then ``format`` is required).
    format: ``"safetensors"`` or ``"msgpack"``; ``None`` chooses from the extension.
    template: optional pytree of nested mappings whose leaves have ``shape`` and ``dtype``
      (arrays, ``jax.ShapeDtypeStruct`` from ``jax.eval_shape(module.init, ...)``): the
      file must hold exactly its keys, with the same shapes and dtypes.
    return_metadata: also return the metadata stored by ``save_variables``.

  Returns:
    The variables as nested dicts (keys sorted) of writable numpy arrays; with
    ``return_metadata``, ``(variables, metadata)`` where ``metadata`` is a str -> str dict
    without the ``"format"`` marker.

  Raises:
    CheckpointError: the file is malformed, truncated, of another library's format, or
      holds something other than arrays in nested maps.
    ValueError: unknown format or extension; the contents do not match ``template``
      (the message names the key).
    TypeError: ``path`` is neither a path nor a binary file object.
  """
  fmt = _resolve_format(path, format)
  label = source_label(path)
  if fmt == "safetensors":
    flat, metadata = _load_safetensors(path, label)
  else:
    flat, metadata = _load_msgpack(path, label)
  if template is not None:
    _check_template(flat, template, label)
  variables = _unflatten(flat, label)
  return (variables, metadata) if return_metadata else variables
