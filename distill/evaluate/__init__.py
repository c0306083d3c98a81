"""``distill eval``: how faithful the student is to its teacher, in HF and in its GGUF files.

    distill eval --run-dir runs/demo/train --gguf-dir runs/demo/dist
    distill eval --run-dir runs/demo/train --teacher HuggingFaceTB/SmolLM2-135M-Instruct \\
        --max-prompts 20 --no-json-check

Measured on the held-out rows (``split: heldout``) of the labelled data (by default the files the
run was trained on, as its ``training_record.json`` lists them), for the student before training
(``<run>/base`` or the base model) and after (``<run>/model``), against the teacher
(``--teacher``, by default the embedded one; it must share the student's vocabulary):

- teacher-forced along the teacher's answers: next-token top-1 agreement and mean
  KL(teacher || student), and each model's perplexity of those answers, the teacher's own beside
  (:mod:`.agreement`);
- the student's greedy answers against the teacher's: chrF and exact match; on ``requires_json``
  rows the JSON-valid and schema-valid rates, free and held to the schema (:mod:`.answers`);
- for each GGUF of ``--gguf-dir``: llama-perplexity's mean KLD, same top p and PPL ratio against
  the unquantized GGUF, beside the teacher's own quantization measured the same way, the
  architecture's ceiling; goal: the student's ``--goal-quant`` no worse than the teacher's
  (:mod:`.gguf`).

Results go to ``<run>/eval.json`` and, as tables, into the model card ``<run>/model/README.md``.
"""

from distill.evaluate.args import NO_REPACK, EvalArgs, EvalError
from distill.evaluate.stage import run

__all__ = ["NO_REPACK", "EvalArgs", "EvalError", "run"]
