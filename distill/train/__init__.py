"""``distill train``: fine-tune a student on the teacher's answers (LoRA, DoRA, QLoRA) and merge.

    distill train --data runs/demo/labelled/quebecois_distill.jsonl --output runs/demo/train
    distill train --data labelled.jsonl --output runs/s --init-from-teacher-every 2 --method dora
    distill train --data labelled.jsonl --output runs/s --method qlora --lora-rank 8 --max-steps 50
    distill train --config train.yaml --output runs/s --resume     # go on from the last checkpoint

Each training sequence is exactly the prompt the teacher saw (``distill.records.render_prompt``,
in the style the labeller recorded in ``metadata.provenance.labeller.prompt_style``) followed by
the teacher's answer and the end-of-sequence token; the loss covers only the answer tokens. Rows
with ``split: heldout`` are kept out of training and used to measure perplexity before and after.

The output directory holds what the run made and how::

    <output>/base/                 the student before training (when layers were dropped)
    <output>/checkpoints/          trainer checkpoints (adapter, optimizer, RNG), for --resume
    <output>/adapter/              the final adapter
    <output>/model/                the merged model, tokenizer with chat template, README.md card
    <output>/training_record.json  config, versions, data hashes, metrics

The package follows the stage's steps: ``args`` (the flags), ``data`` (packing, batches),
``model`` (the student's base, adapters), ``device`` (device plan, autotuning, fused kernels,
checkpointing), ``loop`` (the Trainer), ``merge`` (merged model and tokenizer) and ``stage``
(:func:`run`, which takes them in order).
"""

from __future__ import annotations

from distill.train.args import TrainArgs, TrainError
from distill.train.stage import run

__all__ = ["TrainArgs", "TrainError", "run"]
