"""The transformers teacher: ``generate`` on length-sorted, left-padded batches.

Per batch, one ``generate`` call with logits processors of ours, in this order: the JSON grammar
of each ``requires_json`` row (:mod:`distill.constrain`; free rows of the batch stay
unconstrained), a recorder of the top-K log-probabilities, then the loop guards (repetition
penalty, no-repeat n-gram). The recorded distribution is the teacher's own under the grammar,
at temperature 1: the guards steer which token is picked, but they are decoding heuristics, not
the teacher, and a student learning the penalised distribution learns them instead (on the
demo's rows, the penalised and the teacher's own top-1 differed at 60% of the positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distill.label.args import Answer, Generation, LabelArgs, LabelError
from distill.records import Record, render_prompt


def torch_dtype(name: str, on_gpu: bool) -> Any:
    """The weights dtype ``--dtype`` asks for on this machine."""
    import torch

    if name == "auto":
        if not on_gpu:
            from distill.models import cpu_has_native_bf16

            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def pick_style(requested: str, tokenizer: Any) -> str:
    """The prompt style: the flag, else chat when the tokenizer has a template."""
    if requested != "auto":
        if requested == "chat" and not getattr(tokenizer, "chat_template", None):
            raise LabelError("--prompt-style chat: the teacher's tokenizer has no chat template")
        return requested
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def loop_guards(gen: Generation) -> list[Any]:
    """transformers' repetition penalty and no-repeat n-gram processors, where they are on."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    guards: list[Any] = []
    if gen.repetition_penalty != 1.0:
        guards.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.no_repeat_ngram_size:
        guards.append(NoRepeatNGramLogitsProcessor(gen.no_repeat_ngram_size))
    return guards


class TopKRecorder:
    """Keeps the top-K log-probabilities of every step's final scores (a logits processor)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.steps: list[tuple[Any, Any]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logprobs = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logprobs.topk(self.k, dim=-1)
        self.steps.append((ids.to("cpu", torch.int32), values.to("cpu")))
        return scores

    def row(self, index: int, tokens: int) -> tuple[Any, Any]:
        """(ids [T, K], logprobs [T, K]) of one batch row's first ``tokens`` steps."""
        import torch

        ids = torch.stack([step[0][index] for step in self.steps[:tokens]])
        values = torch.stack([step[1][index] for step in self.steps[:tokens]])
        return ids.numpy(), values.numpy()


class TransformersTeacher:
    """A local or hub model answering batches through ``generate``."""

    def __init__(self, args: LabelArgs) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from distill.logprobs import vocab_hash
        from distill.models import resolve_model

        path, self.source = resolve_model(args.teacher, revision=args.revision, token=args.hf_token)
        on_gpu = torch.cuda.is_available() and args.device_map != "cpu"
        device_map = args.device_map if on_gpu else "cpu"
        self.dtype = torch_dtype(args.dtype, on_gpu)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, device_map=device_map)
        model.eval()
        self.tokenizer = tokenizer
        self.model = model
        self.style = pick_style(args.prompt_style, tokenizer)
        self.constrain_json = args.constrain_json
        self.k = args.logprobs
        self.vocab_hash = vocab_hash(tokenizer)
        self._constraint: Any = None
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stop_ids = set(eos) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )
        self.versions = {"transformers": transformers.__version__, "torch": torch.__version__}
        self.device = str(model.device)

    @property
    def constraint(self) -> Any:
        """The schema compiler for this tokenizer (built on first use)."""
        if self._constraint is None:
            from distill.constrain import SchemaConstraint

            self._constraint = SchemaConstraint(self.tokenizer, self.model.config.vocab_size)
        return self._constraint

    def prompts(self, records: Sequence[Record]) -> list[str]:
        """The rendered prompt of each record."""
        return [render_prompt(r, self.style, self.tokenizer) for r in records]  # type: ignore[arg-type]

    def prompt_tokens(self, records: Sequence[Record]) -> list[int]:
        """Token count of each prompt, in one batched tokenizer call."""
        encoded = self.tokenizer(self.prompts(records), add_special_tokens=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def constrained(self, record: Record) -> bool:
        """Whether this row's answer is held to its schema while generating."""
        return bool(self.constrain_json and record.requires_json and record.json_schema)

    def answer(self, records: Sequence[Record], gen: Generation) -> list[Answer]:
        """One batched ``generate`` for all records (no per-row loop)."""
        import torch

        from distill.logprobs import TokenLogprobs

        # Chat prompts already hold the special tokens; plain prompts get the usual BOS.
        batch = self.tokenizer(
            self.prompts(records),
            return_tensors="pt",
            padding=True,
            add_special_tokens=self.style == "plain",
        ).to(self.model.device)
        processors: list[Any] = []
        schemas = [r.json_schema if self.constrained(r) else None for r in records]
        if any(s is not None for s in schemas):
            processors.append(self.constraint.processor(schemas))
        recorder = TopKRecorder(self.k) if self.k else None
        if recorder:
            processors.append(recorder)
        processors += loop_guards(gen)
        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            # The guards run as ours, after the recorder; none of transformers' own (a model's
            # generation_config may carry them).
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "logits_processor": processors,
        }
        if gen.do_sample:
            kwargs.update(temperature=max(gen.temperature, 1e-3), top_p=gen.top_p, top_k=None)
            torch.manual_seed(gen.seed)
        else:
            # Greedy: unset the sampling knobs a model's generation_config may carry.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        generated = out[:, batch["input_ids"].shape[1] :].tolist()
        answers = []
        for index, ids in enumerate(generated):
            end = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
            ids = ids[:end] if end else ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            logprobs = None
            if recorder:
                import numpy as np

                top_ids, top_lp = recorder.row(index, len(ids))
                logprobs = TokenLogprobs(np.asarray(ids, dtype=np.int32), top_ids, top_lp)
            answer = Answer(text, len(ids), end is not None, logprobs)
            if end is None:
                answer.trimmed = self._trimmed(ids, logprobs)
            answers.append(answer)
        return answers

    def _trimmed(self, ids: list[int], logprobs: Any) -> Answer | None:
        """An answer cut by --max-new-tokens, kept up to its last finished sentence."""
        from distill.label.quality import sentence_prefix
        from distill.logprobs import TokenLogprobs

        def decode(part: Any) -> str:
            return self.tokenizer.decode(part, skip_special_tokens=True)

        n = sentence_prefix(decode, ids)
        if n is None:
            return None
        if logprobs is not None:
            logprobs = TokenLogprobs(
                logprobs.token_ids[:n], logprobs.top_ids[:n], logprobs.top_logprobs[:n]
            )
        return Answer(decode(ids[:n]).strip(), n, False, logprobs, cut_from=len(ids))

    def describe(self) -> dict[str, Any]:
        """Backend, model and versions for the provenance record."""
        return {
            "backend": "transformers",
            "model": self.source["name"],
            "revision": self.source["revision"],
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "vocab_hash": self.vocab_hash,
            **self.versions,
        }
