"""RA-DIT (Lin et al., ICLR 2024; REFERENCE §6): retrieval-augmented dual instruction tuning.

Stages `lsr` (query-encoder fine-tuning by LM-supervised retrieval) and `ra-it` (LM fine-tuning
with one retrieved chunk per example), REPLUG-style parallel in-context inference for the QA
evaluator, and the `ra-dit` recipe. See docs/radit.md.
"""
