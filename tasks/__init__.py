"""SeqIO task registrations. Importing `tasks` (or `tasks.tldr`) registers the
TL;DR tasks: tldr_sft, tldr_comparisons (and the *_t5 variants)."""

from tasks import tldr  # noqa: F401  (registers the tasks)
