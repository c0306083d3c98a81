"""Generation held to a JSON Schema, through xgrammar, for any transformers model.

    constraint = SchemaConstraint(tokenizer, model.config.vocab_size)
    processor = constraint.processor([schema_a, None, schema_b])   # one entry per batch row
    model.generate(**batch, logits_processor=[processor])

Each row of a batch gets its own grammar, or none (a free-text row in the same batch stays
unconstrained). A schema is compiled once per tokenizer and cached by its canonical JSON. The
grammar is xgrammar's strict mode: no property the schema does not name, so a teacher cannot
answer with the schema itself (``{"$schema": ...}``) where an object was asked for.

Why xgrammar: it runs on the CPU and on CUDA with one code path, keeps a precomputed token mask
per grammar state (a step costs a bitmask fill, not a walk over the vocabulary in Python), is
the structured-output engine vLLM, SGLang and TensorRT-LLM ship by default, and plugs into
``generate`` as a plain ``LogitsProcessor``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


class ConstraintError(ValueError):
    """A schema that xgrammar cannot turn into a grammar."""


def _canonical(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# Bounds given to unbounded strings and arrays while generating: a small teacher that loops
# inside a string ("2018-01-01 2018-01-01 ...") or a list otherwise runs to --max-new-tokens and
# leaves JSON that never closes. The answer is still validated against the row's own schema.
MAX_STRING = 100
MAX_ITEMS = 8


def bounded(schema: Any, max_string: int = MAX_STRING, max_items: int = MAX_ITEMS) -> Any:
    """A copy of ``schema`` whose strings and arrays without a bound of their own get one."""
    if isinstance(schema, list):
        return [bounded(s, max_string, max_items) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v, max_string, max_items) for k, v in schema.items()}
    kinds = out.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "string" in kinds and not {"maxLength", "enum", "const", "pattern", "format"} & out.keys():
        out["maxLength"] = max(max_string, int(out.get("minLength", 0)))
    if "array" in kinds and "maxItems" not in out:
        out["maxItems"] = max(max_items, int(out.get("minItems", 0)))
    return out


class SchemaConstraint:
    """Compiles JSON Schemas for one tokenizer and builds per-batch logits processors."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        import xgrammar as xgr

        # The model's embedding can be wider than the tokenizer (padding rows): the mask must
        # cover the logits' whole width.
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info)
        self._cache: dict[str, Any] = {}

    def compile(self, schema: Mapping[str, Any]) -> Any:
        """The compiled grammar of one schema (cached)."""
        key = _canonical(schema)
        if key not in self._cache:
            try:
                self._cache[key] = self.compiler.compile_json_schema(
                    _canonical(bounded(schema)), any_whitespace=False, strict_mode=True
                )
            except Exception as err:  # xgrammar raises RuntimeError/ValueError from C++
                raise ConstraintError(f"schema cannot be compiled to a grammar: {err}") from None
        return self._cache[key]

    def processor(self, schemas: Sequence[Mapping[str, Any] | None]) -> GrammarProcessor:
        """A fresh processor for one ``generate`` call; ``None`` leaves that row free."""
        return GrammarProcessor([None if s is None else self.compile(s) for s in schemas])


class GrammarProcessor:
    """Masks each constrained row's logits to the tokens its grammar allows next.

    Unlike ``xgrammar.contrib.hf.LogitsProcessor`` it leaves unconstrained rows alone (and rows
    whose grammar has accepted its stop token: generate pads them). One instance per call.
    (A plain callable: ``generate`` takes any ``(input_ids, scores) -> scores``.)
    """

    def __init__(self, grammars: Sequence[Any | None]) -> None:
        import xgrammar as xgr

        self.grammars = list(grammars)
        self.matchers = [None if g is None else xgr.GrammarMatcher(g) for g in self.grammars]
        constrained = [g for g in self.grammars if g is not None]
        self.vocab_size = constrained[0].tokenizer_info.vocab_size if constrained else 0
        self.bitmask = (
            xgr.allocate_token_bitmask(len(self.grammars), self.vocab_size) if constrained else None
        )
        self.started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch
        import xgrammar as xgr

        if self.bitmask is None:
            return scores
        if input_ids.shape[0] != len(self.matchers):
            raise RuntimeError(
                f"grammar processor built for {len(self.matchers)} rows, got {input_ids.shape[0]}"
            )
        rows = []
        for i, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            if self.started and not matcher.is_terminated():
                token = int(input_ids[i, -1])
                if not matcher.accept_token(token):
                    raise RuntimeError(f"row {i}: generated token {token} the grammar refuses")
            if matcher.is_terminated():
                continue  # it accepted a stop token: generate pads the row from here on
            matcher.fill_next_token_bitmask(self.bitmask, i)
            rows.append(i)
        self.started = True
        if rows:
            # The CPU kernel works on float32 logits; bf16 ones go through a float32 copy.
            target = scores if scores.dtype == torch.float32 or scores.is_cuda else scores.float()
            xgr.apply_token_bitmask_inplace(
                target, self.bitmask.to(target.device), vocab_size=self.vocab_size, indices=rows
            )
            if target is not scores:
                scores.copy_(target)
        return scores
