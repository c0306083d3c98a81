"""``distill train``: fine-tune a student on the teacher's answers (LoRA, DoRA, QLoRA) and merge.

    distill train --data runs/demo/labelled/quebecois_distill.jsonl --output runs/demo/train
    distill train --data labelled.jsonl --output runs/s --init-from-teacher-every 2 --method dora
    distill train --data labelled.jsonl --output runs/s --method qlora --lora-rank 8 --max-steps 50
    distill train --config train.yaml --output runs/s --resume     # go on from the last checkpoint
    distill train --data labelled.jsonl --output runs/s --loss kd  # rows labelled with --logprobs
    distill train --data labelled.jsonl --output runs/s --loss mix --kd-weight 0.3 --on-policy 0.5 \
        --teacher-model embedded:smollm2-135m-instruct             # GKD: the student samples
    torchrun --nproc-per-node 4 -m distill.cli train --data labelled.jsonl --output runs/s

Each training sequence is exactly the prompt the teacher saw (``distill.records.render_prompt``,
in the style the labeller recorded in ``metadata.provenance.labeller.prompt_style``) followed by
the teacher's answer and the end-of-sequence token; the loss covers only the answer tokens:
cross-entropy (``--loss sft``), or the KL to the teacher's stored top-K distributions (``kd``,
``mix``; see :mod:`distill.train.losses`), optionally on the student's own samples
(``--on-policy``, :mod:`distill.train.onpolicy`). Rows with ``split: heldout`` are kept out of
training and used to measure perplexity (and the KL to the teacher) before and after.

The output directory holds what the run made and how::

    <output>/base/                 the student before training (when layers were dropped)
    <output>/checkpoints/          trainer checkpoints (adapter, optimizer, RNG), for --resume
    <output>/adapter/              the final adapter
    <output>/model/                the merged model, tokenizer with chat template, README.md card
    <output>/training_record.json  config, versions, data hashes, metrics

The package follows the stage's steps: ``args`` (the flags), ``teacher`` (the teacher's
targets), ``data`` (packing, batches), ``model`` (the student's base, adapters), ``device``
(device plan, autotuning, fused kernels, checkpointing), ``losses``, ``onpolicy``, ``loop`` (the
Trainer), ``merge`` (merged model and tokenizer), ``ranks`` (several processes: only rank 0
writes) and ``stage`` (:func:`run`, which takes them in order).
"""

from __future__ import annotations

from distill.train.args import TrainArgs, TrainError
from distill.train.stage import run

__all__ = ["TrainArgs", "TrainError", "run"]
