"""Teacher labelling: a teacher model answers every prompt row; the answers become training data.

    distill label --input dataset/quebecois_distill.jsonl --output runs/demo/labelled.jsonl
    distill label --input prompts.jsonl --output out.jsonl \\
        --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct --revision main --batch-size 32
    distill label --input prompts.jsonl --output out.jsonl --teacher-url http://127.0.0.1:8080 \\
        --concurrency 8            # llama-server, vLLM, ollama: any OpenAI-compatible server
    distill label --input prompts.jsonl --output out.jsonl \
        --teacher-url http://gpu1:8080#8,http://gpu2:8080#2   # two servers, 8 and 2 at a time
    distill label --input prompts.jsonl --output out.jsonl --logprobs 20   # the top 20 kept
    distill label --input prompts.jsonl --output out.jsonl --skip-existing   # resume after a crash

Rows need only ``user`` (see :mod:`distill.records`). A conversation row's ``history`` reaches
the teacher as the earlier turns (chat messages, or named paragraphs in the plain style) and it
answers the last user turn; a ``reference`` answer that came with the row is never sent.

Two backends (:mod:`distill.label.teacher_hf`, :mod:`distill.label.teacher_openai`).
``transformers`` loads a local directory or hub id and feeds ``generate`` prompts sorted by
length in left-padded batches. ``openai`` sends the rows to OpenAI-compatible servers, several
requests at a time, spread by load (:mod:`distill.label.servers`: failover, ``Retry-After``).
With neither ``--teacher`` nor ``--teacher-url``, the embedded SmolLM2-135M-Instruct teacher
answers.

``requires_json`` rows: generation is held to the row's ``json_schema`` (xgrammar for
transformers, ``response_format`` for a server; ``--no-constrain-json`` turns it off); the
answer is still parsed and validated afterwards, retried when invalid, and rejected with the
reason if it stays so.

The quality gate (:mod:`distill.label.quality`): empty, looping, repetitive, truncated or
wrong-language answers go to the rejects file with the reason, never into training. Free-text
rows are generated with a repetition penalty and a no-repeat n-gram size (flags, recorded in
provenance) so the teacher loops less to begin with.

Crash safety: the whole input is validated before anything is written; each batch's answers
are appended in one write with fsync, after the batch's log-probabilities (``--logprobs``,
:mod:`distill.logprobs`) are on disk; a torn last line, or blocks no row points at, are cut on
the next run; ``--skip-existing`` skips every id already in the output or the rejects file. A
finished run rewrites the output in input order (atomically), so a resumed run ends with the
same file.
"""

from distill.label.args import Answer, Generation, LabelArgs, LabelError, Teacher
from distill.label.run import Summary, label, make_teacher, run
from distill.label.teacher_hf import TransformersTeacher
from distill.label.teacher_openai import OpenAITeacher

__all__ = [
    "Answer",
    "Generation",
    "LabelArgs",
    "LabelError",
    "OpenAITeacher",
    "Summary",
    "Teacher",
    "TransformersTeacher",
    "label",
    "make_teacher",
    "run",
]
